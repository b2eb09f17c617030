"""The independent reference: HF transformers (+ PEFT) on the same weights, greedy.

Correctness tests compare vLLM/vllm-slora token ids with these, never with the code
under test.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=2)
def _base_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def hf_greedy(
    model_dir: Path | str,
    prompts: list[list[int]],
    max_new_tokens: int,
    adapter_dir: Path | str | None = None,
) -> list[list[int]]:
    """Greedy continuation token ids (stopping after EOS) for each prompt."""
    import torch
    from peft import PeftModel

    base = _base_model(str(model_dir))
    model = PeftModel.from_pretrained(base, str(adapter_dir)) if adapter_dir else base
    eos = base.generation_config.eos_token_id
    try:
        outputs = []
        with torch.no_grad():
            for ids in prompts:
                inp = torch.tensor([ids])
                gen = model.generate(
                    input_ids=inp,
                    attention_mask=torch.ones_like(inp),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=eos if isinstance(eos, int) else eos[0],
                )
                outputs.append(gen[0, len(ids):].tolist())
        return outputs
    finally:
        if adapter_dir:
            # Remove the injected LoRA layers so the cached base model stays clean.
            model.unload()


def trim_after_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens
