"""Shared fixtures. vLLM engines take 25-45 s to start here, so they are session-wide."""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import pytest

# Small, fixed KV budget: deterministic across machines and leaves room for HF models.
TEST_KV_BYTES = 512 * 1024 * 1024


# Set before any test runs: vLLM loads plugins once per process, so the pytest
# process's own `plugin_loaded` record is written at the first EngineArgs of the session.
# setdefault: test modules that import helpers from here (`tests.conftest`) import this
# file a second time, which must not point the trace somewhere else.
os.environ.setdefault(
    "VLLM_SLORA_TRACE_FILE", str(Path(tempfile.mkdtemp(prefix="slora-trace-")) / "trace.jsonl")
)
_TRACE_PATH = Path(os.environ["VLLM_SLORA_TRACE_FILE"])


@pytest.fixture(scope="session")
def trace_file() -> Path:
    """Every vllm-slora event of every process started by the tests lands here."""
    return _TRACE_PATH


@pytest.fixture(scope="session")
def default_model() -> Path:
    from vllm_slora.model_prep import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tests.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def default_adapters(default_model, tmp_path_factory):
    """Four PEFT adapters for the default model, ranks 8..64, all 7 projections."""
    from vllm_slora.adapters.generate import generate_adapters

    return generate_adapters(
        default_model / "config.json",
        tmp_path_factory.mktemp("adapters"),
        num_adapters=4,
        ranks=(8, 16, 32, 64),
        seed=1234,
    )


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
    )
    if slora is not None:
        kwargs["additional_config"] = {"slora": slora}
    kwargs.update(overrides)
    return LLM(**kwargs)


def close_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def slora_llm(trace_file, default_model):
    """The plugin-enabled engine on the embedded default model, shared by all tests."""
    # Room for a few dozen adapters next to the KV cache (~5.9 MB per block here).
    llm = make_llm(default_model, slora={}, kv_cache_memory_bytes=3 * TEST_KV_BYTES)
    yield llm
    close_llm(llm)
