"""Layer-sliced work units (co-serving): the gradients and a 20-step AdamW loss curve equal
HF transformers + PEFT, and dropout replays the same masks in the recomputing backward."""

from __future__ import annotations

import pytest
import torch

from tests.finetune.peft_reference import (
    hf_adamw_loss_curve,
    hf_micro_batch_loss,
    load_hf,
    peft_lora_tensors,
    peft_model_like,
    relative_error,
)
from tests.finetune.training_cases import TARGET_SETS, packed_examples, random_lora
from vllm_slora.finetune import layer_units
from vllm_slora.finetune.base_weights import base_weights_from_hf
from vllm_slora.finetune.forward import PackedLayout, decoder_layer
from vllm_slora.finetune.layer_units import (
    BWD_ATTN,
    BWD_MLP,
    FWD_ATTN,
    FWD_MLP,
    LOSS,
    LOSS_SLICE,
    LayerSlicedPass,
)
from vllm_slora.finetune.lora_params import LoraParams, LoraSettings
from vllm_slora.finetune.loss import packed_loss
from vllm_slora.finetune.model_config import DecoderConfig
from vllm_slora.finetune.packing import pack_examples
from vllm_slora.finetune.trainer import LoraTrainer, TrainingSettings

# Layers that keep their graphs from FWD to BWD: none (recompute), the top one only (a graph
# budget short of the whole pass), every one.
GRAPHS = {"recompute": lambda layers: 0, "top-layer-kept": lambda layers: 1, "keep-graph": lambda layers: layers}


def run_pass(base, lora, batch, rng_state=None, keep_graph=False, graph_layers=None,
             mlp_rows=None, loss_slices=None, loss_tokens=None) -> LayerSlicedPass:
    """Every unit of a pass, MLP units of `mlp_rows` rows (None: whole blocks), the loss in
    groups of (rows, LM head columns) `loss_slices` (None: LOSS_CHUNK-row units); checks the order."""
    unit_pass = LayerSlicedPass(base, lora, batch, rng_state, keep_graph=keep_graph, graph_layers=graph_layers,
                                loss_tokens=loss_tokens)
    kinds = []
    while not unit_pass.done:
        kind = unit_pass.next_kind
        if kind in (FWD_MLP, BWD_MLP):
            kinds.append(unit_pass.run_unit(mlp_rows))
        elif kind in (LOSS, LOSS_SLICE) and loss_slices is not None:
            kinds.append(unit_pass.run_unit(*loss_slices))
        else:
            kinds.append(unit_pass.run_unit())
    layers = len(base.layers)
    mlp_units = 1 if mlp_rows is None or lora.settings.dropout else -(-batch.num_tokens // mlp_rows)
    if loss_slices is None:
        loss = [LOSS] * (unit_pass.num_units - 4 * layers)
    else:  # per group of rows: every slice twice (logits, then their gradient)
        rows, columns = loss_slices
        groups = -(-unit_pass.num_loss_tokens // rows)
        loss = [LOSS_SLICE] * (groups * 2 * -(-base.lm_head.shape[0] // columns))
    expected = ([FWD_ATTN] + [FWD_MLP] * mlp_units) * layers + loss + ([BWD_MLP] * mlp_units + [BWD_ATTN]) * layers
    assert kinds == expected
    return unit_pass


@pytest.mark.parametrize("rows", [(64, None, None), (5, 17, None), (64, 17, (64, 100)), (7, None, (9, 37))],
                         ids=["whole-blocks", "loss-and-mlp-in-chunks", "loss-in-vocab-slices",
                              "loss-in-row-groups-and-vocab-slices"])
@pytest.mark.parametrize("graphs", sorted(GRAPHS))
@pytest.mark.parametrize("targets", sorted(TARGET_SETS))
def test_unit_gradients_equal_hf_peft(tiny_model, targets, graphs, rows, monkeypatch):
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    lora = random_lora(config, **TARGET_SETS[targets])
    peft = peft_model_like(hf, lora)
    examples = packed_examples(config.vocab_size)
    (batch,) = pack_examples(examples, batch_tokens=64)
    assert len(batch.seq_lens) == 3
    loss_chunk, mlp_rows, loss_slices = rows
    monkeypatch.setattr(layer_units, "LOSS_CHUNK", loss_chunk)

    base = base_weights_from_hf(peft)
    assert len(base.layers) >= 2  # "top-layer-kept" keeps some layers' graphs, not all
    unit_pass = run_pass(base, lora, batch, graph_layers=GRAPHS[graphs](len(base.layers)), mlp_rows=mlp_rows,
                         loss_slices=loss_slices)

    reference = hf_micro_batch_loss(peft, examples)
    reference.backward()
    assert unit_pass.loss == pytest.approx(reference.item(), rel=1e-5)
    live = peft_lora_tensors(peft, lora)
    for key, param in lora.named_parameters():
        assert param.grad is not None, key
        assert relative_error(param.grad, live[key].grad) < 1e-4, key


def test_loss_units_of_any_sizes_give_hf_peft_gradients(tiny_model):
    """The worker sizes each LOSS unit to its step (all rows at once when idle, vocabulary
    slices of a group of rows under load): any sequence of sizes covers every loss row once,
    and the loss and gradients still equal HF + PEFT's."""
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    lora = random_lora(config, **TARGET_SETS["all7"])
    peft = peft_model_like(hf, lora)
    examples = packed_examples(config.vocab_size)
    (batch,) = pack_examples(examples, batch_tokens=64)
    unit_pass = LayerSlicedPass(base_weights_from_hf(peft), lora, batch, keep_graph=True)
    # (rows, LM head columns): 0 rows still make progress (one row); a group in vocabulary
    # slices between row-chunked units (a loaded step between idle ones).
    sizes = iter([(3, None), (1, None), (6, 200), (0, None), (4, 64), (1000, None)])
    loss_units = []
    while not unit_pass.done:
        if unit_pass.next_kind == LOSS:
            before = unit_pass.loss_rows_left
            rows, columns = next(sizes)
            unit_pass.run_unit(rows, columns)
            while unit_pass.next_kind == LOSS_SLICE:
                unit_pass.run_unit(None, columns)
            loss_units.append(before - unit_pass.loss_rows_left)
        else:
            unit_pass.run_unit()
    assert unit_pass.num_loss_tokens > 15
    assert loss_units == [3, 1, 6, 1, 4, unit_pass.num_loss_tokens - 15] and unit_pass.loss_rows_left == 0

    reference = hf_micro_batch_loss(peft, examples)
    reference.backward()
    assert unit_pass.loss == pytest.approx(reference.item(), rel=1e-5)
    live = peft_lora_tensors(peft, lora)
    for key, param in lora.named_parameters():
        assert relative_error(param.grad, live[key].grad) < 1e-4, key


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("keep_layers", [0, 1], ids=["all-dropped", "top-layer-left"])
@pytest.mark.parametrize("when", ["mid-forward", "mid-mlp-forward", "after-the-loss", "mid-mlp-backward",
                                  "mid-backward"])
def test_graphs_dropped_mid_pass_leave_the_gradients_unchanged(tiny_model, when, dropout, keep_layers):
    """The KV cache can call back the memory of kept graphs (all, or the lower layers') at any
    unit boundary: the pass goes on recomputing those layers and ends with the gradients of
    a pass that kept every graph."""
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    (batch,) = pack_examples(packed_examples(config.vocab_size), batch_tokens=64)
    base = base_weights_from_hf(hf)
    start = torch.Generator().manual_seed(99).get_state()
    layers = len(base.layers)
    assert layers >= 2
    mlp_rows = 24  # 3 MLP units per block without dropout (the drop can fall between two of them)
    mlp_units = 1 if dropout else -(-batch.num_tokens // mlp_rows)
    loss_units = LayerSlicedPass(base, random_lora(config), batch).num_units - 4 * layers
    forward_units = layers * (1 + mlp_units)
    drop_before = {"mid-forward": 2, "mid-mlp-forward": forward_units - 1,
                   "after-the-loss": forward_units + loss_units, "mid-mlp-backward": forward_units + loss_units + 1,
                   "mid-backward": forward_units + loss_units + mlp_units + 1}[when]  # the unit index the drop precedes
    grads = []
    for drop in (None, drop_before):
        lora = random_lora(config, dropout=dropout, **TARGET_SETS["all7"])
        unit_pass = LayerSlicedPass(base, lora, batch, start, keep_graph=True)
        units = 0
        while not unit_pass.done:
            if units == drop:
                unit_pass.drop_graphs(keep_layers)
                assert unit_pass.graph_layers == keep_layers
                assert not any(unit_pass.holds_graph(layer) for layer in range(layers - keep_layers))
            unit_pass.run_unit(mlp_rows if unit_pass.next_kind in (FWD_MLP, BWD_MLP) else None)
            units += 1
        grads.append({k: p.grad.clone() for k, p in lora.named_parameters()})
    kept, dropped = grads
    for key in kept:
        assert relative_error(dropped[key], kept[key]) < 1e-5, key


def test_a_partial_graph_budget_keeps_the_top_layers_graphs(tiny_model):
    """graph_layers=k: after the forward units exactly the top k layers hold a graph (what the
    worker's budget counts); the backward frees each as it passes."""
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    (batch,) = pack_examples(packed_examples(config.vocab_size), batch_tokens=64)
    base = base_weights_from_hf(hf)
    layers = len(base.layers)
    with pytest.raises(ValueError, match="graph_layers"):
        LayerSlicedPass(base, random_lora(config), batch, graph_layers=layers + 1)
    unit_pass = LayerSlicedPass(base, random_lora(config), batch, graph_layers=1)
    assert unit_pass.keep_graph
    while unit_pass.next_kind in (FWD_ATTN, FWD_MLP):
        unit_pass.run_unit()
    assert [unit_pass.holds_graph(layer) for layer in range(layers)] == [False] * (layers - 1) + [True]
    while not unit_pass.done:
        unit_pass.run_unit()
    assert not any(unit_pass.holds_graph(layer) for layer in range(layers))
    boundary = 4 * 64 * config.hidden_size  # a kept layer's attention output is in its graph
    assert layer_units.pass_bytes(64, config, 1) == (layer_units.activation_bytes(64, config, False) - boundary
                                                     + layer_units.layer_graph_bytes(64, config))
    full = layer_units.activation_bytes(64, config, True)
    assert layer_units.graph_layers_within(64, config, full) == layers
    assert layer_units.graph_layers_within(64, config, full - 1) == layers - 1
    assert layer_units.graph_layers_within(64, config, 0) == 0


@pytest.mark.parametrize("graphs", sorted(GRAPHS))
def test_dropout_backward_replays_forward_masks(tiny_model, graphs):
    """With LoRA dropout the recomputing BWD units must see the FWD units' masks: the gradients
    equal one whole-graph backward drawing from the same random stream; the global stream is
    left untouched (inference sampling in the same process must not be shifted)."""
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    lora = random_lora(config, dropout=0.3, **TARGET_SETS["all7"])
    base = base_weights_from_hf(hf)
    (batch,) = pack_examples(packed_examples(config.vocab_size), batch_tokens=64)
    start = torch.Generator().manual_seed(1234).get_state()

    global_before = torch.get_rng_state()
    # (MLP units asked for 17 rows take the whole block: its masks are one draw.)
    unit_pass = run_pass(base, lora, batch, rng_state=start, graph_layers=GRAPHS[graphs](len(base.layers)),
                         mlp_rows=17)
    assert torch.equal(torch.get_rng_state(), global_before)
    ours = {k: p.grad.clone() for k, p in lora.named_parameters()}

    for p in lora.parameters():
        p.grad = None
    torch.set_rng_state(start)
    loss = packed_loss(base, lora, batch.input_ids, batch.seq_lens, batch.targets, training=True)
    loss.backward()
    assert unit_pass.loss == pytest.approx(loss.item(), rel=1e-6)
    for key, param in lora.named_parameters():
        assert relative_error(ours[key], param.grad) < 1e-5, key
    # Another stream gives other masks (the check above can fail).
    for p in lora.parameters():
        p.grad = None
    other = run_pass(base, lora, batch, rng_state=torch.Generator().manual_seed(99).get_state())
    assert other.loss != pytest.approx(unit_pass.loss, rel=1e-6)


def test_twenty_unit_steps_match_hf_peft_loop(tiny_model):
    """20 AdamW steps run as units (the co-serving path) give the HF+PEFT loop's loss curve."""
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    examples = packed_examples(config.vocab_size, lengths=(9, 17, 5, 12, 7, 20), seed=5)
    batches = pack_examples(examples, batch_tokens=32)
    assert len(batches) >= 3
    lora = LoraParams.init(config, LoraSettings(r=4, alpha=8.0), seed=0)
    peft = peft_model_like(hf, lora)
    settings = TrainingSettings(max_steps=20, lr=1e-2, weight_decay=0.01, warmup_steps=3, max_grad_norm=1.0)
    trainer = LoraTrainer(base_weights_from_hf(peft), lora, settings)
    losses = []
    for step in range(20):
        batch = batches[step % len(batches)]
        lr = trainer.lr
        trainer.zero_grad()
        unit_pass = run_pass(trainer.base, lora, batch)
        record = trainer.update(batch, unit_pass.loss, lr, 0.0)
        assert record.step == step + 1
        losses.append(record.loss)

    ref_losses = hf_adamw_loss_curve(peft, lora, examples, batches, 20, lr=1e-2, weight_decay=0.01,
                                     warmup_steps=3, max_grad_norm=1.0)
    for ours, ref in zip(losses, ref_losses):
        assert abs(ours - ref) <= 1e-4 * abs(ref), (losses, ref_losses)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("lens", [(64,), (16, 16, 16, 16), (10, 30, 24)], ids=["one", "equal", "mixed"])
def test_layer_graph_estimate_covers_what_autograd_saves(tiny_model, lens, dropout):
    """The graph budget (worker, loans) counts layer_graph_bytes per kept layer: it must not be
    below what autograd really keeps for a layer (else graphs overrun the loan), nor far above
    (else fewer layers keep graphs than fit)."""
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    base = base_weights_from_hf(hf)
    lora = random_lora(config, dropout=dropout, **TARGET_SETS["all7"])
    layout = PackedLayout.build(lens, config, base.dtype, "cpu")
    hidden = torch.randn(sum(lens), config.hidden_size, requires_grad=True)
    weights = {t.untyped_storage().data_ptr() for _, t in base.named_tensors()}
    weights |= {p.untyped_storage().data_ptr() for p in lora.parameters()} | {hidden.untyped_storage().data_ptr()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder_layer(hidden, base.layers[0], lora.layer(0), layout, config, dropout, training=True)
    real = sum(saved.values())
    rank = max(m.rank for m in lora.modules.values())
    estimate = layer_units.layer_graph_bytes(lens, config, lora_rank=rank, dropout=dropout > 0)
    assert real <= estimate <= 1.25 * real, (real, estimate)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("mlp_rows", [None, 24], ids=["whole-mlp", "mlp-in-chunks"])
def test_pass_bytes_cover_what_a_pass_with_every_graph_holds(tiny_model, mlp_rows, dropout):
    """After its forward units, a pass that keeps every layer's graph holds its boundaries, what
    autograd saved and (MLP in row chunks) the chunks' outputs: at least that is counted by
    pass_bytes + chunk_output_bytes, at most 1.25x."""
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    base = base_weights_from_hf(hf)
    lora = random_lora(config, dropout=dropout, **TARGET_SETS["all7"])
    (batch,) = pack_examples(packed_examples(config.vocab_size), batch_tokens=64)
    excluded = {t.untyped_storage().data_ptr() for _, t in base.named_tensors()}
    excluded |= {p.untyped_storage().data_ptr() for p in lora.parameters()}
    held = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            held[storage.data_ptr()] = storage.nbytes()
        return tensor

    layers = len(base.layers)
    unit_pass = LayerSlicedPass(base, lora, batch, torch.Generator().manual_seed(0).get_state(), keep_graph=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        while unit_pass.next_kind in (FWD_ATTN, FWD_MLP):
            unit_pass.run_unit(mlp_rows)
    for tensor in unit_pass._boundaries:
        held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    for graphs in unit_pass._mlp_graphs:
        for _, _, out in graphs:
            held[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    held.pop(unit_pass.input_ids.untyped_storage().data_ptr(), None)
    real = sum(held.values())
    rank = max(m.rank for m in lora.modules.values())
    counted = (layer_units.pass_bytes(batch.seq_lens, config, layers, lora_rank=rank, dropout=dropout > 0)
               + unit_pass.chunk_output_bytes())
    assert (unit_pass.chunk_output_bytes() > 0) == (mlp_rows is not None and not dropout)
    assert real <= counted <= 1.25 * real, (real, counted)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("sizes", [(None, None, None), (5, 17, None), (7, None, (9, 37))],
                         ids=["whole-blocks", "loss-and-mlp-in-chunks", "loss-in-row-groups-and-vocab-slices"])
def test_an_evaluation_pass_gives_hf_peft_eval_loss_and_no_gradients(tiny_model, sizes, dropout, monkeypatch):
    """A validation pass (evaluate=True): forward and loss units only, the loss of HF + PEFT in
    eval mode (no dropout) on the same adapter, the LoRA gradients untouched, the dropout
    stream not advanced, and no boundary kept beyond the one the next unit reads."""
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    lora = random_lora(config, dropout=dropout, **TARGET_SETS["all7"])
    peft = peft_model_like(hf, lora)
    examples = packed_examples(config.vocab_size)
    (batch,) = pack_examples(examples, batch_tokens=64)
    loss_chunk, mlp_rows, loss_slices = sizes
    if loss_chunk is not None:
        monkeypatch.setattr(layer_units, "LOSS_CHUNK", loss_chunk)
    base = base_weights_from_hf(peft)
    rng = torch.Generator().manual_seed(5).get_state()
    unit_pass = LayerSlicedPass(base, lora, batch, rng, keep_graph=True, evaluate=True)
    assert unit_pass.graph_layers == 0  # nothing to backpropagate through
    kinds, held = [], []
    while not unit_pass.done:
        kind = unit_pass.next_kind
        if kind == FWD_MLP:
            kinds.append(unit_pass.run_unit(mlp_rows))
        elif kind in (LOSS, LOSS_SLICE) and loss_slices is not None:
            kinds.append(unit_pass.run_unit(*loss_slices))
        else:
            kinds.append(unit_pass.run_unit())
        held.append(sum(b is not None for b in unit_pass._boundaries))
    layers = len(base.layers)
    assert BWD_MLP not in kinds and BWD_ATTN not in kinds
    assert kinds.count(FWD_ATTN) == layers and kinds[-1] in (LOSS, LOSS_SLICE)
    assert max(held) <= 2  # the boundary a unit reads and the one it writes, no more
    assert unit_pass.rng_state is None or torch.equal(unit_pass.rng_state, rng)
    assert all(param.grad is None for param in lora.parameters())

    with torch.no_grad():
        reference = hf_micro_batch_loss(peft, examples).item()  # HF eval mode: no dropout
    assert unit_pass.loss == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("graphs", ["recompute", "keep-graph"])
def test_a_step_of_several_micro_batches_accumulates_the_whole_steps_gradients(tiny_model, graphs):
    """An optimizer step split into micro-batches (loss_tokens = the step's loss tokens): the
    losses add up to, and the accumulated gradients equal, HF + PEFT's token mean over all of
    the step's examples at once."""
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    lora = random_lora(config, **TARGET_SETS["all7"])
    peft = peft_model_like(hf, lora)
    examples = packed_examples(config.vocab_size, lengths=(9, 17, 5, 12))
    batches = pack_examples(examples, batch_tokens=26)
    assert len(batches) >= 2
    total = sum(b.num_loss_tokens for b in batches)
    base = base_weights_from_hf(peft)
    loss = sum(run_pass(base, lora, b, graph_layers=GRAPHS[graphs](len(base.layers)), loss_tokens=total).loss
               for b in batches)
    with pytest.raises(ValueError, match="fewer than the micro-batch's"):
        LayerSlicedPass(base, lora, batches[0], loss_tokens=1)

    reference = hf_micro_batch_loss(peft, examples)
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-5)
    live = peft_lora_tensors(peft, lora)
    for key, param in lora.named_parameters():
        assert relative_error(param.grad, live[key].grad) < 1e-4, key
