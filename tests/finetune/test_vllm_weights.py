"""base_weights_from_vllm on vLLM 0.32's own LlamaForCausalLM (built without an engine, ~15 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.finetune.peft_reference import load_hf, relative_error
from tests.finetune.training_cases import random_lora
from vllm_slora.finetune.model_config import DecoderConfig

REPO = Path(__file__).resolve().parents[2]


def test_training_forward_on_vllm_parameters(tiny_model, tmp_path):
    """Views of vLLM's parameters (no copies, vocab padding cut off) give HF+PEFT's logits, and
    gradients reach the LoRA only. On vLLM's CPU backend the dense linear weights are dropped
    after repacking; base_weights_from_vllm says so instead of failing obscurely."""
    from peft import PeftModel

    config = DecoderConfig.from_hf(tiny_model)
    lora = random_lora(config, seed=2)
    adapter = lora.save_peft(tmp_path / "adapter")
    ids = torch.randint(0, config.vocab_size, (21,), generator=torch.Generator().manual_seed(4))
    torch.save(ids, tmp_path / "ids.pt")
    out = tmp_path / "result.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.finetune.vllm_model_probe", str(tiny_model), str(adapter), str(tmp_path / "ids.pt"), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(out)

    assert "CPU backend repacks linear weights" in result["stock_error"]
    assert result["shares_storage"]
    assert result["padded_vocab"] > config.vocab_size  # vLLM pads; the views cut it off
    assert result["lora_grads"] and not result["base_grads"]
    with torch.no_grad():
        ref = PeftModel.from_pretrained(load_hf(tiny_model), str(adapter))(input_ids=ids[None]).logits[0]
    assert relative_error(result["logits"], ref) < 1e-5
