"""The embedded default model (SmolLM2-135M-Instruct, 30 layers, GQA, tied head): short checks
that the functional forward, PEFT files and a couple of training steps agree with HF + PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from tests.finetune.peft_reference import (
    hf_micro_batch_loss,
    load_hf,
    peft_lora_tensors,
    peft_model_like,
    relative_error,
)
from tests.finetune.training_cases import random_lora
from vllm_slora.finetune.base_weights import base_weights_from_hf
from vllm_slora.finetune.data import load_training_file
from vllm_slora.finetune.forward import forward_logits
from vllm_slora.finetune.packing import pack_examples
from vllm_slora.finetune.trainer import LoraTrainer, TrainingSettings

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Blue is one."}],
    [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}],
]


@pytest.fixture(scope="module")
def smol(default_model):
    return load_hf(default_model)


def test_default_model_logits_and_written_adapter_match_peft(default_model, smol, tmp_path):
    """Packed forward (40 + 24 tokens) with an all-projection LoRA == HF with the written PEFT adapter."""
    from peft import PeftModel

    base = base_weights_from_hf(smol)
    assert base.lm_head is base.embed_tokens  # tied head, used as is
    lora = random_lora(base.config, seed=0)
    adapter = lora.save_peft(tmp_path / "adapter", base_model_name_or_path=str(default_model))
    ids = torch.randint(0, base.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = forward_logits(base, lora, ids, [40, 24])
        peft = PeftModel.from_pretrained(smol, str(adapter))
        try:
            first = peft(input_ids=ids[None, :40]).logits[0]
            second = peft(input_ids=ids[None, 40:]).logits[0]
        finally:
            peft.unload()  # the module-wide HF model goes back to plain base
    assert relative_error(ours[:40], first) < 1e-5
    assert relative_error(ours[40:], second) < 1e-5


def test_default_model_chat_training_steps_match_hf_peft(default_model, smol, tmp_path):
    """Two AdamW steps on chat data (assistant-only loss, packed 2 + 1 conversations): the same
    losses, the same LoRA gradients (step 1) and the same updates as HF + PEFT + torch AdamW."""
    from transformers import AutoTokenizer

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    examples = load_training_file(path, AutoTokenizer.from_pretrained(default_model), max_length=64)
    batches = pack_examples(examples, batch_tokens=96)
    assert len(batches) == 2 and len(batches[0].seq_lens) == 2
    by_line = {e.line: e for e in examples}

    # Non-zero B from the start, so that the A gradients of step 1 are not all 0.
    lora = random_lora(base_weights_from_hf(smol).config, seed=0)
    peft = peft_model_like(smol, lora)
    initial = {key: p.detach().clone() for key, p in lora.named_parameters()}
    try:
        trainer = LoraTrainer(base_weights_from_hf(peft), lora, TrainingSettings(max_steps=2, lr=1e-3))
        ref_params = peft_lora_tensors(peft, lora)
        optimizer = torch.optim.AdamW(ref_params.values(), lr=1e-3)
        for step, batch in enumerate(batches):
            record = trainer.step(batch)
            optimizer.zero_grad()
            ref_loss = hf_micro_batch_loss(peft, [by_line[line] for line in batch.lines])
            ref_loss.backward()
            assert abs(record.loss - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
            if step == 0:  # from identical parameters (afterwards they differ by rounding)
                for key, param in lora.named_parameters():
                    # 30 fp32 layers summed in another order than HF's: 1.3e-4 measured on an
                    # AVX-512 EPYC (under 1e-4 on AVX2); a wrong gradient is off by > 1e-2.
                    assert relative_error(param.grad, ref_params[key].grad) < 3e-4, key
            optimizer.step()
        # Adam moves each element by about lr * sign(g) whatever |g| is, so elements whose
        # gradient is tiny amplify rounding differences: compare each matrix's update by norm.
        for key, param in lora.named_parameters():
            ref = ref_params[key].detach()
            assert float((param.detach() - ref).norm() / (ref - initial[key]).norm()) < 0.05, key
    finally:
        peft.unload()
