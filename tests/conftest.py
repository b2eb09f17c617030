"""Shared fixtures. vLLM engines take 25-45 s to start here, so they are session-wide."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.engines import TEST_KV_BYTES, close_llm, make_llm

# Triton's interpreter for the kernel tests (tests/kernels/conftest.py says why): it must
# be chosen before anything imports triton, and vllm_slora.adapters does (through
# kernels.ops), so it is set here, before any test module is collected.
if not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# Set before any test runs: vLLM loads plugins once per process, so the pytest
# process's own `plugin_loaded` record is written at the first EngineArgs of the session.
_TRACE_PATH = Path(tempfile.mkdtemp(prefix="slora-trace-")) / "trace.jsonl"
os.environ["VLLM_SLORA_TRACE_FILE"] = str(_TRACE_PATH)


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


@pytest.fixture(scope="session")
def slora_llm(trace_file, default_model):
    """The plugin-enabled engine on the embedded default model, shared by all tests."""
    # Room for a few dozen adapters next to the KV cache (~5.9 MB per block here).
    llm = make_llm(default_model, slora={}, kv_cache_memory_bytes=3 * TEST_KV_BYTES)
    yield llm
    close_llm(llm)
