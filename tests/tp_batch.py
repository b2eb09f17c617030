"""The mixed batch both tensor-parallel engine tests (mp and Ray) run, and its HF check."""

from __future__ import annotations

import json

from tests.hf_reference import hf_greedy, trim_after_eos

RANKS = (1, 4, 8, 12, 16, 32, 64)
MAX_TOKENS = 6
PROMPTS = ["the quick brown fox", "paris is the capital of", "many adapters share one base model",
           "a stitch in time"]


def mixed_jobs(tiny_model, adapters) -> list[tuple[object | None, list[int]]]:
    """(adapter or None, prompt ids): one request per adapter, then two base requests."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    return [(a, prompts[i % len(prompts)]) for i, a in enumerate(adapters)] + [(None, p) for p in prompts[:2]]


def generate(llm, jobs) -> list[list[int]]:
    """Greedy tokens of every job, adapter i as lora_int_id 100 + i."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for _, ids in jobs],
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
        lora_request=[LoRARequest(a.name, 100 + i, a.path) if a else None for i, (a, _) in enumerate(jobs)],
    )
    return [list(o.outputs[0].token_ids) for o in outs]


def assert_matches_hf_peft(tiny_model, jobs, tokens, what: str) -> None:
    """Every job's tokens equal HF(+PEFT), and at least half the adapters change the base's."""
    eos = json.loads((tiny_model / "config.json").read_text()).get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos])
    changed = adapters = 0
    for (adapter, ids), got in zip(jobs, tokens):
        want = hf_greedy(tiny_model, [ids], MAX_TOKENS, adapter_dir=adapter.path if adapter else None)[0]
        who = adapter.name if adapter else "base"
        assert trim_after_eos(got, eos) == trim_after_eos(want, eos), f"{who} {what} differs from HF+PEFT"
        if adapter is not None:
            adapters += 1
            changed += want != hf_greedy(tiny_model, [ids], MAX_TOKENS)[0]
    # The comparison only means something if the adapters move the greedy tokens.
    assert changed >= adapters // 2, f"only {changed} of {adapters} adapters change the base model's tokens"
