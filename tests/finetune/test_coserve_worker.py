"""The worker's unit loop (no vLLM): how it sizes LOSS units to the step it was granted and to
the memory training may take (finetune/memory.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tests.finetune.training_cases import packed_examples
from vllm_slora.finetune import coserve_worker, memory
from vllm_slora.finetune.base_weights import base_weights_from_checkpoint
from vllm_slora.finetune.coserve_worker import BATCHES_FILE, WorkerTraining
from vllm_slora.finetune.layer_units import (
    FWD_MLP,
    LOSS,
    LOSS_SLICE,
    LayerSlicedPass,
    activation_bytes,
    layer_graph_bytes,
    pass_bytes,
)
from vllm_slora.finetune.lora_params import LoraParams, LoraSettings
from vllm_slora.finetune.model_config import DecoderConfig
from vllm_slora.finetune.packing import pack_examples, save_batches
from vllm_slora.finetune.trainer import TrainingSettings
from vllm_slora.step_plan import TrainJobSpec, TrainOrder

JOB_RANK = 4  # the rank of job_spec's adapter (sizes its layer graphs)


def job_spec(tiny_model, job_dir, job_id: str = "job") -> TrainJobSpec:
    """A job of the tiny model's packed examples (64-token micro-batches) that never ends."""
    config = DecoderConfig.from_hf(tiny_model)
    batches = pack_examples(packed_examples(config.vocab_size), batch_tokens=64)
    assert batches[0].num_tokens > 2 * 8
    job_dir.mkdir(parents=True, exist_ok=True)
    save_batches(batches, job_dir / BATCHES_FILE)
    LoraParams.init(config, LoraSettings(r=JOB_RANK, alpha=8.0), seed=0).save_peft(job_dir / "step-0")
    return TrainJobSpec(job_id=job_id, adapter_name=f"ft-{job_id}", job_dir=str(job_dir),
                        init_adapter_dir=str(job_dir / "step-0"),
                        settings=dataclasses.asdict(TrainingSettings(max_steps=10**6, lr=1e-3)), total_steps=10**6,
                        publish_every=10**6, seed=0, base_model=str(tiny_model))


@pytest.fixture()
def worker_and_job(tiny_model, tmp_path, monkeypatch):
    spec = job_spec(tiny_model, tmp_path)
    worker = WorkerTraining(None, base_model=str(tiny_model), base=base_weights_from_checkpoint(tiny_model))
    monkeypatch.setattr(coserve_worker, "LOSS_CHUNK", 8)  # the tiny batch has a few chunks of 8 rows
    monkeypatch.setattr(coserve_worker, "MLP_CHUNK", 16)  # ... and of 16 rows
    monkeypatch.setattr(coserve_worker, "VOCAB_CHUNK", 100)  # ... and of 100 of the 512 LM head columns
    sizes: list[int] = []  # rows of each LOSS unit
    worker.mlp_sizes = []  # rows of each FWD_MLP unit
    run_unit = LayerSlicedPass.run_unit

    worker.slice_columns = []  # LM head columns of each LOSS_SLICE unit

    def recording(self, rows=None, vocab=None):
        kind = run_unit(self, rows, vocab)
        if kind == LOSS:
            sizes.append(self.last_unit_rows)
        elif kind == FWD_MLP:
            worker.mlp_sizes.append(self.last_unit_rows)
        elif kind == LOSS_SLICE:
            worker.slice_columns.append(self.last_unit_columns)
        return kind

    monkeypatch.setattr(LayerSlicedPass, "run_unit", recording)
    worker.step(TrainOrder(start=[spec], budget_s=0.0, idle=True))  # one unit: the job starts
    return worker, sizes


def run_pass(worker: WorkerTraining, budget_s: float) -> list:
    steps = worker.jobs["job"].trainer.steps_done
    while worker.jobs["job"].trainer.steps_done == steps:
        worker.step(TrainOrder(budget_s=budget_s, idle=True))
    events = worker.take_events()
    assert not any(e.kind == "failed" for e in events)
    return events


def ample_seconds(worker: WorkerTraining) -> float:
    """A step budget well above one pass of the timed units (LOSS_SLICE times are per 256 x 1024
    LM head cells, far more than the tiny model's slices: left out)."""
    per_layer = sum(s for kind, s in worker.unit_seconds.items() if kind != LOSS_SLICE)
    return 4 * per_layer * len(worker.base.layers)


class _PassDone:
    """An arrivals counter that reports a waiting request once the job's pass has ended: a
    step with all the time in the world (the worker sizes units from the budget left) still
    stops after one pass, whatever this machine's unit times are."""

    def __init__(self, job) -> None:
        self.job, self.steps = job, job.trainer.steps_done

    def waiting(self) -> int:
        return int(self.job.trainer.steps_done > self.steps)


def unbounded_pass(worker: WorkerTraining, short_units: bool = False, idle: bool = True) -> None:
    """One pass of `job` in one step (idle, or loaded: with inference) whose budget never runs out."""
    job = worker.jobs["job"]
    worker._arrivals = lambda path: _PassDone(job)
    try:
        steps = job.trainer.steps_done
        while job.trainer.steps_done == steps:  # (a pass begun earlier ends first)
            worker.step(TrainOrder(budget_s=1e6, idle=idle, short_units=short_units))
    finally:
        del worker._arrivals  # the class's own again


def test_an_idle_step_runs_the_whole_loss_in_one_unit_and_a_short_step_small_ones(worker_and_job):
    worker, sizes = worker_and_job
    run_pass(worker, budget_s=0.0)  # nothing timed yet, then one unit per step: LOSS_CHUNK rows each
    rows = sum(sizes)
    assert sizes == [8] * (rows // 8) + ([rows % 8] if rows % 8 else []) and len(sizes) > 1
    per_chunk = worker.unit_seconds[LOSS]
    assert per_chunk > 0

    sizes.clear()
    unbounded_pass(worker)  # ample time: every loss row in one GEMM
    assert sizes == [rows]

    sizes.clear()
    run_pass(worker, budget_s=0.0)  # no time to spare: back to the shortest units
    assert max(sizes) == 8 and sum(sizes) == rows


def test_mlp_units_take_all_rows_when_idle_and_a_chunk_under_load(worker_and_job):
    """A layer's MLP block runs as one unit of every row when the step has time, as 16-row
    units (MLP_CHUNK here) when it has none: each a point where the step may end."""
    worker, _ = worker_and_job
    run_pass(worker, budget_s=0.0)  # time the units
    tokens = worker.jobs["job"].steps[0][0].num_tokens
    assert tokens > 16
    run_pass(worker, budget_s=0.0)  # (finish the pass a step may have begun)
    worker.mlp_sizes.clear()
    run_pass(worker, budget_s=0.0)
    layers = len(worker.base.layers)
    per_block = [16] * (tokens // 16) + ([tokens % 16] if tokens % 16 else [])
    assert worker.mlp_sizes[-len(per_block) * layers:] == per_block * layers
    worker.mlp_sizes.clear()
    unbounded_pass(worker)
    assert set(worker.mlp_sizes) == {tokens}  # whole blocks


def test_right_after_inference_an_idle_step_keeps_its_units_short(worker_and_job):
    """Requests may arrive any moment (the order says short_units): however long the step,
    the loss runs in VOCAB_CHUNK-column slices and the MLP blocks in MLP_CHUNK-row units,
    each a point where an arrival ends the step; later idle steps run whole blocks."""
    worker, sizes = worker_and_job
    run_pass(worker, budget_s=0.0)  # time the units
    rows = sum(sizes)
    tokens = worker.jobs["job"].steps[0][0].num_tokens
    for short in (True, False):
        run_pass(worker, budget_s=0.0)  # (finish the pass a step may have begun)
        sizes.clear()
        worker.slice_columns.clear()
        worker.mlp_sizes.clear()
        unbounded_pass(worker, short_units=short)
        if short:
            assert not sizes and max(worker.slice_columns) == 100, worker.slice_columns
            assert max(worker.mlp_sizes) == 16
        else:
            assert set(sizes) == {rows} and not worker.slice_columns
            assert set(worker.mlp_sizes) == {tokens}


def test_a_loss_unit_never_outgrows_its_memory_share(worker_and_job, monkeypatch):
    worker, sizes = worker_and_job
    run_pass(worker, budget_s=0.0)  # time the units
    rows = sum(sizes)
    config = worker.base.config
    # Room for the logits of 5 rows only (finetune/memory.py); the tiny batch has more.
    monkeypatch.setattr(memory, "LOSS_UNIT_BYTES", 5 * memory.LOSS_TENSORS * memory.FP32_BYTES * config.vocab_size)
    assert memory.max_loss_rows(config) == 5 < rows
    run_pass(worker, budget_s=0.0)
    sizes.clear()
    run_pass(worker, budget_s=ample_seconds(worker))  # time to spare
    assert sizes and max(sizes) == 5


def test_the_activation_budget_is_shared_by_the_jobs_micro_batches(tiny_model, tmp_path):
    """Two jobs' passes in flight at once: the first keeps its layer graphs, the second only
    fits its layer boundaries beside it and recomputes in backward; alone, it keeps them."""
    config = DecoderConfig.from_hf(tiny_model)
    (batch, *_) = pack_examples(packed_examples(config.vocab_size), batch_tokens=64)
    keep = activation_bytes(batch.seq_lens, config, True, lora_rank=JOB_RANK)
    worker = WorkerTraining(None, base_model=str(tiny_model), base=base_weights_from_checkpoint(tiny_model),
                            activation_budget_bytes=keep + activation_bytes(batch.seq_lens, config, False, lora_rank=JOB_RANK))
    specs = [job_spec(tiny_model, tmp_path / name, name) for name in ("a", "b")]
    worker.step(TrainOrder(start=specs, budget_s=0.0, idle=True))
    while not all(j.unit_pass is not None for j in worker.jobs.values()):
        worker.step(TrainOrder(budget_s=0.0, idle=True))
    kept = {name: worker.jobs[name].unit_pass.keep_graph for name in ("a", "b")}
    assert sorted(kept.values()) == [False, True], kept

    del worker.jobs["a"]  # alone, the next pass of b keeps its graphs
    steps = worker.jobs["b"].trainer.steps_done
    while worker.jobs["b"].trainer.steps_done == steps:
        worker.step(TrainOrder(budget_s=0.0, idle=True))
    worker.step(TrainOrder(budget_s=0.0, idle=True))
    assert worker.jobs["b"].unit_pass.keep_graph


def test_a_budget_short_of_the_whole_pass_keeps_as_many_layer_graphs_as_it_holds(tiny_model, tmp_path):
    """A loan that covers part of the graphs (a small pool lends part: pool/training_loan.py)
    buys part of the speed: the pass keeps the top layers' graphs that fit, and a shrinking
    budget drops only as many as it must; the pass still ends with a finite loss."""
    config = DecoderConfig.from_hf(tiny_model)
    (batch, *_) = pack_examples(packed_examples(config.vocab_size), batch_tokens=64)
    layers, layer = config.num_layers, layer_graph_bytes(batch.seq_lens, config, lora_rank=JOB_RANK)
    assert layers >= 2
    boundaries = pass_bytes(batch.seq_lens, config, 0, lora_rank=JOB_RANK)
    worker = WorkerTraining(None, base_model=str(tiny_model), base=base_weights_from_checkpoint(tiny_model))
    worker.set_graph_budget(boundaries + (layers - 1) * layer + layer // 2)  # all layers but one, and a half
    worker.step(TrainOrder(start=[job_spec(tiny_model, tmp_path)], budget_s=0.0, idle=True))
    worker.step(TrainOrder(budget_s=0.0, idle=True))
    job = worker.jobs["job"]
    assert job.unit_pass.graph_layers == layers - 1
    assert worker.graph_layer_bytes() == layer
    while job.unit_pass.next_kind != LOSS:
        worker.step(TrainOrder(budget_s=0.0, idle=True))
    assert [job.unit_pass.holds_graph(layer) for layer in range(layers)] == [False] + [True] * (layers - 1)

    worker.set_graph_budget(boundaries + (layers - 2) * layer + 1)  # one layer's graph less
    assert job.unit_pass.graph_layers == layers - 2
    assert [job.unit_pass.holds_graph(layer) for layer in range(layers)] == [False, False] + [True] * (layers - 2)
    steps = job.trainer.steps_done
    (step,) = [e for e in run_pass(worker, budget_s=0.0) if e.kind == "step"]
    assert job.trainer.steps_done == steps + 1 and math.isfinite(job.last_loss)
    # The job's step event tells how many layers kept their graphs (list_events shows it).
    assert (step.data["graph_layers"], step.data["graph_layers_at_end"], step.data["layers"]) == (
        layers - 1, layers - 2, layers)


def test_a_recalled_loan_drops_the_graphs_in_flight_and_the_pass_goes_on(tiny_model, tmp_path):
    """Graphs live in pool blocks lent by the scheduler (pool/training_loan.py): they are kept
    only within the loan, dropped when it is called back, and kept again once it returns."""
    worker = WorkerTraining(None, base_model=str(tiny_model), base=base_weights_from_checkpoint(tiny_model),
                            activation_budget_bytes=1 << 40)
    worker.set_graph_budget(0)  # a CPU engine before any loan
    # The step a job starts in runs none of its units: its report asks for the loan first.
    assert worker.step(TrainOrder(start=[job_spec(tiny_model, tmp_path)], budget_s=0.0, idle=True)) == (0.0, 0)
    job = worker.jobs["job"]
    assert job.unit_pass is None
    wanted = worker.graph_bytes_wanted()
    assert wanted == activation_bytes(job.next_batch().seq_lens, worker.base.config, True, lora_rank=JOB_RANK)
    worker.step(TrainOrder(budget_s=0.0, idle=True))  # no loan came (the pool had no room): recompute
    assert job.unit_pass is not None and not job.unit_pass.keep_graph

    run_pass(worker, budget_s=0.0)
    worker.set_graph_budget(wanted)  # lent
    worker.step(TrainOrder(budget_s=0.0, idle=True))
    layers = job.unit_pass.num_layers
    assert job.unit_pass.keep_graph and any(job.unit_pass.holds_graph(layer) for layer in range(layers))  # kept

    worker.set_graph_budget(0)  # recalled mid-pass
    assert not job.unit_pass.keep_graph and not any(job.unit_pass.holds_graph(layer) for layer in range(layers))
    steps = job.trainer.steps_done
    run_pass(worker, budget_s=0.0)
    assert job.trainer.steps_done == steps + 1 and math.isfinite(job.last_loss)
    worker.step(TrainOrder(budget_s=0.0, idle=True))
    assert not job.unit_pass.keep_graph  # no loan: the next pass keeps no graph

    worker.set_graph_budget(None)  # engines without loans: the configured budget
    assert worker.graph_budget_bytes == 1 << 40


def test_under_load_the_loss_runs_in_vocabulary_slices(worker_and_job):
    """Steps with inference run the loss as slices of the LM head (VOCAB_CHUNK columns, here
    100 of 512, each twice: logits, then gradient) when their units must be short, wider ones
    when they have time to spare (here: a budget that never runs out, whatever this
    machine's unit times); never by rows. The passes end with finite losses."""
    worker, sizes = worker_and_job
    run_pass(worker, budget_s=0.0)  # time the units (idle)
    job = worker.jobs["job"]
    vocab = worker.base.lm_head.shape[0]
    worker.slice_columns.clear()
    sizes.clear()
    ample = ample_seconds(worker)
    steps = job.trainer.steps_done
    while job.trainer.steps_done < steps + 2:
        worker.step(TrainOrder(budget_s=ample, short_units=True))  # loaded: the shortest units
    slices = -(-vocab // 100)
    assert worker.slice_columns[:2 * slices] == ([100] * (slices - 1) + [vocab % 100]) * 2
    assert not sizes and math.isfinite(job.last_loss)
    unbounded_pass(worker, idle=False)  # (finish the pass a step may have begun)
    worker.slice_columns.clear()
    unbounded_pass(worker, idle=False)
    assert worker.slice_columns and min(worker.slice_columns) > 100  # time to spare: wider slices
    assert not sizes


def test_units_take_whole_row_and_column_chunks_so_their_gemm_shapes_repeat(worker_and_job):
    """oneDNN (frozen_linear.py) makes a primitive per new GEMM shape (~0.7 ms on 2 cores) and
    caches it: loaded steps size their units in whole MLP_CHUNKs of rows and VOCAB_CHUNKs of
    LM head columns (here 16 and 100), whatever the budget left; only a block's last rows and
    the vocabulary's last columns are what remains of them."""
    worker, _ = worker_and_job
    run_pass(worker, budget_s=0.0)  # time the units
    tokens = worker.jobs["job"].steps[0][0].num_tokens
    per_chunk = worker.unit_seconds[FWD_MLP]
    worker.mlp_sizes.clear()
    worker.slice_columns.clear()
    for factor in (1.5, 2.7, 3.3, 4.6, 7.1) * 30:
        worker.step(TrainOrder(budget_s=factor * per_chunk))
    assert worker.mlp_sizes and worker.slice_columns
    assert {rows % 16 for rows in worker.mlp_sizes} <= {0, tokens % 16}, worker.mlp_sizes
    assert max(worker.mlp_sizes) > 16  # budgets of several chunks took several
    vocab = worker.base.lm_head.shape[0]
    assert {columns % 100 for columns in worker.slice_columns} <= {0, vocab % 100}, worker.slice_columns


def test_a_kept_layer_runs_its_mlp_in_chunks_only_if_their_outputs_fit_the_budget(tiny_model, tmp_path,
                                                                                    monkeypatch):
    """Row chunks of a kept layer's MLP hold their outputs (and LoRA copies) beyond the pass's
    graphs: with a budget of exactly every graph, loaded steps run those blocks whole; with
    room to spare, in MLP_CHUNK rows."""
    monkeypatch.setattr(coserve_worker, "MLP_CHUNK", 16)
    config = DecoderConfig.from_hf(tiny_model)
    (batch, *_) = pack_examples(packed_examples(config.vocab_size), batch_tokens=64)
    exact = activation_bytes(batch.seq_lens, config, True, lora_rank=JOB_RANK)
    for budget, expected in ((exact, {batch.num_tokens}), (4 * exact, {16, batch.num_tokens % 16 or 16})):
        worker = WorkerTraining(None, base_model=str(tiny_model), base=base_weights_from_checkpoint(tiny_model),
                                activation_budget_bytes=budget)
        worker.step(TrainOrder(start=[job_spec(tiny_model, tmp_path / str(budget))], budget_s=0.0, idle=True))
        job = worker.jobs["job"]
        sizes = []
        run_unit = LayerSlicedPass.run_unit

        def recording(self, rows=None, vocab=None, sizes=sizes, run_unit=run_unit):
            kind = run_unit(self, rows, vocab)
            if kind == FWD_MLP:
                sizes.append(self.last_unit_rows)
            return kind

        monkeypatch.setattr(LayerSlicedPass, "run_unit", recording)
        while job.trainer.steps_done < 2:
            worker.step(TrainOrder(budget_s=1.0, short_units=True))  # loaded: the shortest units
        assert job.unit_pass is None or job.unit_pass.keep_graph
        assert set(sizes) == expected, (budget, sizes)
        assert not any(e.kind == "failed" for e in worker.take_events())


def test_a_paused_job_runs_nothing_drops_its_graphs_and_resumes_to_the_same_weights(tiny_model, tmp_path):
    """Paused mid-backward beside another job: it runs no unit while the other trains, gives
    its layer graphs back, and once resumed ends its steps with the weights of a job that was
    never paused (its backward recomputes what it dropped)."""
    import torch

    def new_worker():
        return WorkerTraining(None, base_model=str(tiny_model), base=base_weights_from_checkpoint(tiny_model),
                              activation_budget_bytes=1 << 40)

    def train_until(worker, job, steps):
        while job.trainer.steps_done < steps:
            worker.step(TrainOrder(budget_s=0.0, idle=True))

    alone = new_worker()
    alone.step(TrainOrder(start=[job_spec(tiny_model, tmp_path / "alone", "a")], budget_s=0.0, idle=True))
    train_until(alone, alone.jobs["a"], 3)
    expected = [p.detach().clone() for p in alone.jobs["a"].lora.parameters()]

    worker = new_worker()
    worker.step(TrainOrder(start=[job_spec(tiny_model, tmp_path / name, name) for name in ("a", "b")],
                           budget_s=0.0, idle=True))
    a, b = worker.jobs["a"], worker.jobs["b"]
    train_until(worker, a, 1)
    while a.unit_pass is None or a.unit_pass.next_kind != "bwd_attn":  # into its backward, graphs kept
        worker.step(TrainOrder(budget_s=0.0, idle=True))
    layers = a.unit_pass.num_layers
    assert a.unit_pass.keep_graph and any(a.unit_pass.holds_graph(layer) for layer in range(layers))

    worker.step(TrainOrder(pause=["a"], budget_s=0.0, idle=True))
    assert not any(a.unit_pass.holds_graph(layer) for layer in range(layers))
    assert worker.graph_bytes_wanted() == activation_bytes(b.next_batch().seq_lens if b.unit_pass is None
                                                           else b.unit_pass.batch.seq_lens, worker.base.config,
                                                           True, lora_rank=JOB_RANK)
    where = (a.trainer.steps_done, a.unit_pass.next_kind, a.spent_s)
    b_steps = b.trainer.steps_done
    train_until(worker, b, b_steps + 2)  # b trains on alone
    assert (a.trainer.steps_done, a.unit_pass.next_kind, a.spent_s) == where
    assert [e.kind for e in worker.take_events() if e.job_id == "a"][-1] == "paused"

    b_spent = b.spent_s
    worker.step(TrainOrder(resume=["a"], budget_s=0.0, idle=True))
    assert a.spent_s >= b_spent  # its fair share runs from now on: no catch-up burst owed to it
    train_until(worker, a, 3)
    for got, want in zip(a.lora.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def validation_examples(vocab: int):
    return packed_examples(vocab, lengths=(7, 12, 4, 15), seed=9)


def hf_validation_loss(tiny_model, adapter_dir, examples) -> float:
    """HF + PEFT (eval mode) on the published files: the token-mean loss over every example."""
    import torch
    from peft import PeftModel

    from tests.finetune.peft_reference import hf_micro_batch_loss, load_hf

    with torch.no_grad():
        return hf_micro_batch_loss(PeftModel.from_pretrained(load_hf(tiny_model), str(adapter_dir)), examples).item()


@pytest.mark.parametrize("units", ["idle-whole-units", "short-units"])
def test_each_published_version_is_validated_with_hf_peft_loss_and_training_is_unchanged(tiny_model, tmp_path, units,
                                                                                         monkeypatch):
    """A job with validation micro-batches validates every published step (forward-only units,
    the loss in vocabulary slices when units must be short): the loss over the whole set equals
    HF + PEFT's on the published files, the job ends after its last validation, and its weights
    equal those of the same job without validation."""
    import torch

    from vllm_slora.finetune.coserve_worker import VALIDATION_BATCHES_FILE

    config = DecoderConfig.from_hf(tiny_model)
    examples = validation_examples(config.vocab_size)
    batches = pack_examples(examples, batch_tokens=20)
    assert len(batches) >= 2  # the whole set takes several evaluation passes
    evaluation_units = []
    run_unit = LayerSlicedPass.run_unit

    def recording(self, rows=None, vocab=None):
        kind = run_unit(self, rows, vocab)
        if self.evaluate:
            evaluation_units.append(kind)
        return kind

    monkeypatch.setattr(LayerSlicedPass, "run_unit", recording)

    def run(name: str, validate: bool):
        spec = dataclasses.replace(job_spec(tiny_model, tmp_path / name, name), total_steps=4, publish_every=2)
        spec.settings["max_steps"] = 4
        if validate:
            save_batches(batches, tmp_path / name / VALIDATION_BATCHES_FILE)
        worker = WorkerTraining(None, base_model=str(tiny_model), base=base_weights_from_checkpoint(tiny_model),
                                activation_budget_bytes=1 << 40)
        worker.step(TrainOrder(start=[spec], budget_s=0.0, idle=True))
        events, job = [], worker.jobs[name]
        for _ in range(100_000):
            if name not in worker.jobs:
                break
            worker.step(TrainOrder(budget_s=1e6 if units == "idle-whole-units" else 0.0, idle=True,
                                   short_units=units == "short-units"))
            events += worker.take_events()
        assert not any(e.kind == "failed" for e in events), events
        return job, events

    plain, _ = run("plain", validate=False)
    job, events = run("validated", validate=True)
    kinds = [(e.kind, e.step) for e in events if e.kind in ("published", "validated", "finished")]
    assert kinds == [("published", 2), ("validated", 2), ("published", 4), ("validated", 4), ("finished", 4)]
    for event in (e for e in events if e.kind == "validated"):
        assert event.data["batches"] == len(batches)
        assert event.data["loss_tokens"] == sum(b.num_loss_tokens for b in batches)
        reference = hf_validation_loss(tiny_model, tmp_path / "validated" / f"step-{event.step}", examples)
        assert event.data["loss"] == pytest.approx(reference, rel=1e-5)
    losses = [e.data["loss"] for e in events if e.kind == "validated"]
    assert losses[0] != losses[1]  # the second validation sees the newer weights
    # Short units: the validation's loss in vocabulary slices too; idle: one LOSS unit per micro-batch.
    sliced = LOSS_SLICE in evaluation_units
    assert sliced == (units == "short-units") and "bwd_mlp" not in evaluation_units
    if not sliced:
        assert evaluation_units.count(LOSS) == 2 * len(batches)
    for got, want in zip(job.lora.parameters(), plain.lora.parameters(), strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=0)
