"""The independent reference for finetuning tests: HF transformers + PEFT on the same weights.

The code under test (vllm_slora.finetune) is only used to *provide* identical inputs here
(the initial A/B values, the examples); every number compared against it comes from HF's
model, PEFT's LoRA layers and HF's own causal-LM loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_slora.finetune.data import TrainingExample
from vllm_slora.finetune.lora_params import LoraParams


def load_hf(model_dir, **config_overrides):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **config_overrides)
    model.eval()  # no dropout anywhere (there is none in Llama, but be explicit)
    return model


def peft_key(our_key: str) -> str:
    """Our PEFT-file key -> the key in a live PeftModel's state dict (adapter name 'default')."""
    return our_key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


def peft_model_like(hf_model, lora: LoraParams):
    """Wrap `hf_model` (in place, as PEFT does) with LoRA layers holding `lora`'s current A/B."""
    from peft import LoraConfig, get_peft_model

    s = lora.settings
    config = LoraConfig(
        r=s.r, lora_alpha=s.alpha, target_modules=list(s.target_modules), use_rslora=s.use_rslora, lora_dropout=0.0
    )
    model = get_peft_model(hf_model, config)
    state = model.state_dict()
    with torch.no_grad():
        for key, param in lora.named_parameters():
            state[peft_key(key)].copy_(param)
    return model


def peft_lora_tensors(model, lora: LoraParams) -> dict[str, torch.Tensor]:
    """The PEFT model's live A/B, keyed like ours."""
    live = dict(model.named_parameters())
    return {key: live[peft_key(key)] for key, _ in lora.named_parameters()}


def hf_micro_batch_loss(model, examples: Sequence[TrainingExample]) -> torch.Tensor:
    """HF's loss for a micro-batch: each sequence alone, HF's ForCausalLMLoss summing token
    losses divided by the micro-batch's loss-token count (num_items_in_batch), summed over
    sequences == token mean over the whole micro-batch (what a padded HF batch computes)."""
    count = sum(e.num_loss_tokens for e in examples)
    total = 0.0
    for example in examples:
        ids = torch.tensor([example.input_ids])
        labels = torch.tensor([example.labels])
        total = total + model(input_ids=ids, labels=labels, num_items_in_batch=count).loss
    return total


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to the reference's scale (max |ref|)."""
    scale = ref.detach().abs().max().clamp_min(1e-12)
    return float((ours.detach() - ref.detach()).abs().max() / scale)


def hf_adamw_loss_curve(peft, lora: LoraParams, examples: Sequence[TrainingExample], batches, steps: int, lr: float,
                        weight_decay: float = 0.01, warmup_steps: int = 0, max_grad_norm: float | None = None):
    """The reference training loop: HF+PEFT loss on each step's examples (cycling in order),
    torch AdamW, linear warmup, optional clipping. Returns the loss of every step. A step is a
    packed micro-batch, or a list of them (an accumulated step), whose examples are taken at once."""
    params = list(peft_lora_tensors(peft, lora).values())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    by_line = {e.line: e for e in examples}
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        lines = batch.lines if hasattr(batch, "lines") else [line for micro in batch for line in micro.lines]
        optimizer.zero_grad()
        loss = hf_micro_batch_loss(peft, [by_line[line] for line in lines])
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses
