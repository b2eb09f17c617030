"""A plugin engine on CPU running compiled (vLLM's default settings, inductor), vs HF + PEFT.

vLLM's CPU platform runs every LoRA engine eagerly; the plugin turns compilation back
on for its engines (vllm_slora/activation.py). vLLM traces the model once, in the
warm-up dummy run where no token has an adapter, and never re-traces
(DYNAMO_TRACE_ONCE): the mixed batch below must still get every adapter's delta.
"""

from __future__ import annotations

import os

import pytest

from tests.engines import close_llm, make_llm
from tests.hf_reference import hf_greedy, trim_after_eos
from tests.test_unified_paging import MAX_TOKENS, _eos, mixed_adapters, tokenized  # noqa: F401  (fixtures)
from vllm_slora import trace

pytestmark = pytest.mark.engine


def engine_traces(trace_file) -> list[dict]:
    """Trace events of the LoRA op from engine workers (not from this test process)."""
    return [e for e in trace.read(str(trace_file)) if e["event"] == "lora_op_traced" and e["pid"] != os.getpid()]


@pytest.fixture(scope="module")
def compiled_llm(trace_file, default_model):
    llm = make_llm(default_model, slora={}, enforce_eager=False, kv_cache_memory_bytes=3 << 29)
    yield llm
    close_llm(llm)


def test_compiled_engine_mixed_batch_matches_hf_peft(compiled_llm, default_model, mixed_adapters, tokenized,
                                                     trace_file):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from vllm_slora.compat import CompilationMode

    config = compiled_llm.llm_engine.vllm_config.compilation_config
    assert config.mode == CompilationMode.DYNAMO_TRACE_ONCE and config.backend == "inductor"
    # The LoRA op was traced exactly while no token had an adapter (the warm-up run).
    traced = engine_traces(trace_file)
    assert traced and all(not e["any_adapter"] for e in traced), traced

    jobs = [(a, tokenized[i % len(tokenized)]) for i, a in enumerate(mixed_adapters)]
    jobs += [(None, ids) for ids in tokenized[:3]]
    loras = [LoRARequest(a.name, 2000 + i, a.path) if a else None for i, (a, _) in enumerate(jobs)]
    outs = compiled_llm.generate([TokensPrompt(prompt_token_ids=ids) for _, ids in jobs],
                                 SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), lora_request=loras)
    eos = _eos(default_model)
    for (adapter, ids), out in zip(jobs, outs):
        want = hf_greedy(default_model, [ids], MAX_TOKENS, adapter_dir=adapter.path if adapter else None)[0]
        who = adapter.name if adapter else "base"
        assert trim_after_eos(list(out.outputs[0].token_ids), eos) == trim_after_eos(want, eos), (
            f"{who}: compiled engine differs from HF(+PEFT)"
        )
    # Still one trace: steps with adapters ran the graph traced without them.
    assert engine_traces(trace_file) == traced
