"""Building and closing vLLM engines in tests (shared by conftest fixtures and test modules).

Kept out of conftest.py: a test module importing `tests.conftest` would load that file a
second time as another module and re-run its module-level set-up.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

# Small, fixed KV budget: deterministic across machines and leaves room for HF models.
TEST_KV_BYTES = 512 * 1024 * 1024
RESERVED_CPU = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def make_llm(model: Path, slora: dict | None, **overrides):
    from vllm import LLM

    kwargs = dict(
        model=str(model),
        dtype="float32",
        enable_lora=True,
        max_lora_rank=64,
        max_model_len=1024,
        kv_cache_memory_bytes=TEST_KV_BYTES,
        seed=0,
        # Plugin engines run compiled on CPU by default (vllm_slora/activation.py); the
        # inductor build costs minutes on 2 cores, so tests run eager unless they are
        # about compilation (tests/test_compiled_engine.py).
        enforce_eager=True,
    )
    if slora is not None:
        kwargs["additional_config"] = {"slora": slora}
    kwargs.update(overrides)
    # A finetune engine sets VLLM_CPU_NUM_OF_RESERVED_CPU=0 for the engine processes it
    # starts (vllm_slora/activation.py); keep it from reaching later engines of the session.
    reserved = os.environ.get(RESERVED_CPU)
    try:
        return LLM(**kwargs)
    finally:
        if reserved is None:
            os.environ.pop(RESERVED_CPU, None)
        else:
            os.environ[RESERVED_CPU] = reserved


def make_finetune_llm_in_pool(model: Path, pool_blocks: int, block_bytes: int, block_size: int):
    """A co-serving engine (max_model_len 256) whose KV pool holds exactly `pool_blocks` blocks."""
    return make_llm(model, slora={"finetune": True}, max_model_len=256, block_size=block_size,
                    kv_cache_memory_bytes=pool_blocks * block_bytes)


def make_adapters_known(llm, loras) -> None:
    """One token per adapter, so a later batch of them arrives in one engine step.

    The first sight of an adapter is validated where its request enters (every weight is
    read once) while the engine already steps, so a batch of new adapters would otherwise
    spread over several steps.
    """
    from vllm import SamplingParams

    llm.generate(["Hi."] * len(loras), SamplingParams(max_tokens=1), lora_request=list(loras), use_tqdm=False)


def close_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
