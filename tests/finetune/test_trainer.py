"""The training loop against a HF + PEFT + torch AdamW loop, and the offline finetune()."""

from __future__ import annotations

import json

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
from tests.finetune.training_cases import write_training_file
from vllm_slora.finetune.base_weights import base_weights_from_checkpoint, base_weights_from_hf
from vllm_slora.finetune.data import load_training_file
from vllm_slora.finetune.forward import forward_logits
from vllm_slora.finetune.lora_params import LoraParams, LoraSettings
from vllm_slora.finetune.model_config import DecoderConfig
from vllm_slora.finetune.packing import pack_examples
from vllm_slora.finetune.trainer import LoraTrainer, TrainingSettings, finetune


def test_twenty_adamw_steps_match_hf_peft(tiny_model, tmp_path):
    """Same init, data and order: the loss curve and the final adapter equal a plain HF+PEFT loop
    (torch AdamW with weight decay, linear warmup, gradient clipping)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = load_training_file(write_training_file(tmp_path / "train.jsonl"), tokenizer, max_length=40)
    batches = pack_examples(examples, batch_tokens=40)
    assert len(batches) >= 2 and any(len(b.seq_lens) > 1 for b in batches)
    settings = TrainingSettings(max_steps=20, lr=1e-2, weight_decay=0.01, warmup_steps=3, max_grad_norm=1.0)

    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    lora = LoraParams.init(config, LoraSettings(r=4, alpha=8.0), seed=0)
    peft = peft_model_like(hf, lora)  # same initial A/B (B = 0, as PEFT)
    trainer = LoraTrainer(base_weights_from_hf(peft), lora, settings)
    seen = []
    records = trainer.train(batches, progress=seen.append)
    assert seen == records and [r.step for r in records] == list(range(1, 21))

    # The reference: HF+PEFT forward and loss, torch AdamW, same schedule and clipping.
    ref_params = list(peft_lora_tensors(peft, lora).values())
    optimizer = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    by_line = {e.line: e for e in examples}
    ref_losses, ref_lrs = [], []
    for step in range(20):
        batch = batches[step % len(batches)]
        optimizer.zero_grad()
        ref_lrs.append(optimizer.param_groups[0]["lr"])
        loss = hf_micro_batch_loss(peft, [by_line[line] for line in batch.lines])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        optimizer.step()
        scheduler.step()
        ref_losses.append(loss.item())

    losses = [r.loss for r in records]
    for ours, ref in zip(losses, ref_losses):
        assert abs(ours - ref) <= 1e-4 * abs(ref), (losses, ref_losses)
    assert [r.lr for r in records] == pytest.approx(ref_lrs)
    assert losses[-1] < 0.8 * losses[0]  # it actually learned something
    assert all(r.loss_tokens == batches[(r.step - 1) % len(batches)].num_loss_tokens for r in records)
    assert all(r.grad_norm is not None and r.seconds > 0 for r in records)
    ref_final = peft_lora_tensors(peft, lora)
    # Adam moves every element by about lr * sign(g) whatever |g| is, so elements whose gradient
    # is rounding noise (in both implementations) differ by up to lr: compare whole matrices
    # by norm, with a looser bound per element.
    for key, param in lora.named_parameters():
        ref = ref_final[key].detach()
        assert float((param.detach() - ref).norm() / ref.norm()) < 2e-4, key
        assert relative_error(param, ref) < 1e-3, key


def test_trainer_runs_inside_inference_mode(tiny_model):
    """vLLM's execute_model runs under inference_mode; a step called from there still trains."""
    hf = load_hf(tiny_model)
    base = base_weights_from_hf(hf)
    lora = LoraParams.init(base.config, LoraSettings(r=2, target_modules=("v_proj",)), seed=0)
    from vllm_slora.finetune.data import TrainingExample

    batch = pack_examples([TrainingExample(1, list(range(3, 15)), list(range(3, 15)))], batch_tokens=16)[0]
    trainer = LoraTrainer(base, lora, TrainingSettings(max_steps=1, lr=1e-2, checkpoint_layers=True))
    with torch.inference_mode():
        record = trainer.step(batch)
    assert record.loss > 0 and torch.count_nonzero(lora.modules[0, "v_proj"].b) > 0


def test_offline_finetune_writes_a_peft_adapter_and_plot(tiny_model, tmp_path):
    """finetune(): HF checkpoint -> trained PEFT adapter that PEFT loads to our forward's logits."""
    from peft import PeftModel

    train_file = write_training_file(tmp_path / "train.jsonl")
    steps = []
    result = finetune(
        tiny_model, train_file, tmp_path / "out", rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"),
        max_steps=6, lr=1e-2, batch_tokens=48, seed=1, progress=steps.append,
    )
    assert len(result.records) == len(steps) == 6
    assert result.records[-1].loss < result.records[0].loss
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training_log.json", "loss.png"} <= files
    assert result.plot_path is not None and result.plot_path.read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((result.adapter_dir / "training_log.json").read_text())) == 6

    base = base_weights_from_checkpoint(tiny_model)
    lora = LoraParams.from_peft_dir(result.adapter_dir, base.config)
    ids = torch.randint(0, base.config.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = forward_logits(base, lora, ids)
        ref = PeftModel.from_pretrained(load_hf(tiny_model), str(result.adapter_dir))(input_ids=ids[None]).logits[0]
    assert relative_error(ours, ref) < 1e-5


def test_offline_finetune_batch_size_accumulates_as_hf_peft_trains_whole_steps(tiny_model, tmp_path):
    """finetune(batch_size=3): three examples a step in micro-batches of at most batch_tokens, their
    gradients accumulated: the loss curve equals an HF + PEFT AdamW loop taking each step's
    examples at once. batch_size below 1 is refused naming it."""
    from transformers import AutoTokenizer

    from vllm_slora.finetune.packing import step_micro_batches, step_totals

    train_file = write_training_file(tmp_path / "train.jsonl")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        finetune(tiny_model, train_file, tmp_path / "none", batch_size=0)
    result = finetune(tiny_model, train_file, tmp_path / "out", rank=4, alpha=8.0, max_steps=4, lr=1e-2,
                      batch_tokens=16, truncate=True, batch_size=3)
    examples = load_training_file(train_file, AutoTokenizer.from_pretrained(tiny_model), max_length=16, truncate=True)
    steps = step_micro_batches(examples, 3, 16)
    assert all(len(step) >= 2 for step in steps)
    assert [r.tokens for r in result.records] == [step_totals(steps[i % len(steps)])[0] for i in range(4)]
    hf = load_hf(tiny_model)
    lora = LoraParams.init(DecoderConfig.from_hf(hf.config), LoraSettings(r=4, alpha=8.0), seed=0)
    reference = hf_adamw_loss_curve(peft_model_like(hf, lora), lora, examples, steps, 4, lr=1e-2)
    assert [r.loss for r in result.records] == pytest.approx(reference, rel=1e-4)


def test_checkpoint_loader_matches_hf_layout(tiny_model):
    """base_weights_from_checkpoint (no HF model object) == base_weights_from_hf, tensor for tensor."""
    from_file = dict(base_weights_from_checkpoint(tiny_model).named_tensors())
    from_hf = dict(base_weights_from_hf(load_hf(tiny_model)).named_tensors())
    assert from_file.keys() == from_hf.keys()
    for name, tensor in from_hf.items():
        assert torch.equal(from_file[name], tensor), name
