"""Operator actions on a running engine never take it down (issue #9 A, 2, 4, 5).

Tiny Llama, offline `LLM`, a 1 MiB host cache (so adapters leave it and are read from
disk again). Tokens are compared with HF transformers + PEFT; pool figures come from
the scheduler's trace events.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.engines import close_llm, make_llm
from tests.hf_reference import hf_greedy
from vllm_slora import trace

pytestmark = pytest.mark.engine

PROMPT = [1, 17, 33, 90, 4, 250]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def lifecycle_adapters(tiny_model, tmp_path_factory):
    from vllm_slora.adapters.generate import generate_adapters

    root = tmp_path_factory.mktemp("lifecycle")
    config = tiny_model / "config.json"
    small = generate_adapters(config, root / "small", 4, ranks=(8,), seed=31, output_scale=1.0)
    big = generate_adapters(config, root / "big", 1, ranks=(64,), seed=32, output_scale=1.0)
    fillers = generate_adapters(config, root / "fill", 8, ranks=(16,), seed=33, name_prefix="fill")
    return {"small": [a.path for a in small], "big": big[0].path, "fill": [a.path for a in fillers]}


def engine(tiny_model, trace_path, tp: int = 1):
    os.environ[trace.TRACE_ENV] = str(trace_path)  # inherited by the engine processes
    return make_llm(tiny_model, slora={"host_cache_mb": 1}, max_model_len=256, tensor_parallel_size=tp,
                    distributed_executor_backend="mp")


@pytest.fixture(scope="module")
def lifecycle_llm(tiny_model, tmp_path_factory):
    previous = os.environ.get(trace.TRACE_ENV)
    trace_path = tmp_path_factory.mktemp("lifecycle-trace") / "trace.jsonl"
    llm = engine(tiny_model, trace_path)
    llm.trace_path = trace_path
    yield llm
    close_llm(llm)
    os.environ[trace.TRACE_ENV] = previous or ""


def generate(llm, adapters, max_tokens: int = MAX_TOKENS):
    """One batch; each entry is a LoRARequest or None (base model)."""
    from vllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=PROMPT) for _ in adapters]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0] for o in llm.generate(prompts, params, lora_request=list(adapters), use_tqdm=False)]


def reference(tiny_model, adapter_dir=None) -> list[int]:
    return hf_greedy(tiny_model, [PROMPT], MAX_TOKENS, adapter_dir)[0][:MAX_TOKENS]


def last_step(llm) -> dict:
    return [e for e in trace.read(str(llm.trace_path)) if e["event"] == "step"][-1]


def lora(name: str, lora_int_id: int, path, **kwargs):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, lora_int_id, str(path), **kwargs)


def replace_files(src, dst) -> None:
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        os.remove(os.path.join(dst, file))
        shutil.copy(os.path.join(src, file), os.path.join(dst, file))


def swap_and_check(llm, tiny_model, adapters, workdir, base_id: int) -> None:
    """Issue #9 A / item 4: files of a rank-64 adapter copied over a loaded rank-8 one."""
    victim_dir = workdir / "victim"
    shutil.copytree(adapters["small"][0], victim_dir)
    victim = lora("victim", base_id, victim_dir)
    other = lora("other", base_id + 1, adapters["small"][1])
    assert generate(llm, [victim])[0].token_ids == reference(tiny_model, victim_dir)
    # Other adapters push it out of the 1 MiB host cache, a prefix-cache reset out of the pool.
    generate(llm, [lora(f"fill{i}", base_id + 10 + i, p) for i, p in enumerate(adapters["fill"])], max_tokens=1)
    replace_files(adapters["big"], victim_dir)
    llm.reset_prefix_cache()

    failed, served, base = generate(llm, [victim, other, None])
    assert failed.finish_reason == "error", (failed.finish_reason, failed.token_ids)
    assert "'victim'" in str(failed.stop_reason) and "changed on disk" in str(failed.stop_reason)
    # What the OpenAI server answers with (patches/patch_output_processor.py).
    assert failed.finish_reason.message == failed.stop_reason
    assert list(failed.token_ids) == []  # nothing computed with pages it could not fill
    assert served.token_ids == reference(tiny_model, adapters["small"][1])
    assert base.token_ids == reference(tiny_model)
    # The engine serves on; the next request registers the new files and is served by them.
    again, base = generate(llm, [victim, None])
    assert again.finish_reason != "error" and again.token_ids == reference(tiny_model, victim_dir)
    assert base.token_ids == reference(tiny_model)


def test_swapped_files_fail_only_their_requests(lifecycle_llm, tiny_model, lifecycle_adapters, tmp_path):
    swap_and_check(lifecycle_llm, tiny_model, lifecycle_adapters, tmp_path, base_id=100)


def test_load_inplace_request_reloads_only_on_new_files(lifecycle_llm, tiny_model, lifecycle_adapters, tmp_path):
    # Issue #9 item 2: vLLM reuses the LoRARequest of an in-place load for every later
    # request; the flag alone must not re-register, bump the version and read the disk.
    adapter_dir = tmp_path / "inplace"
    shutil.copytree(lifecycle_adapters["small"][2], adapter_dir)
    sticky = lora("inplace", 300, adapter_dir, load_inplace=True)
    assert generate(lifecycle_llm, [sticky])[0].token_ids == reference(tiny_model, adapter_dir)
    loads = last_step(lifecycle_llm)["loads"]
    for _ in range(3):
        assert generate(lifecycle_llm, [sticky, sticky])[0].token_ids == reference(tiny_model, adapter_dir)
    assert last_step(lifecycle_llm)["loads"] == loads, "the load_inplace flag alone reloaded the adapter"
    # New files: the next request is served by them (one load).
    replace_files(lifecycle_adapters["small"][3], adapter_dir)
    assert generate(lifecycle_llm, [sticky])[0].token_ids == reference(tiny_model, adapter_dir)
    assert last_step(lifecycle_llm)["loads"] == loads + 1


def test_unload_returns_pages_and_host_memory(lifecycle_llm, lifecycle_adapters):
    # Issue #9 item 5: remove_lora (what /v1/unload_lora_adapter now calls) frees the
    # adapter's pool pages and every host copy.
    llm = lifecycle_llm
    generate(llm, [None])
    before = last_step(llm)
    entries_before = llm.collective_rpc("slora_info")[0]["host_cache"]["entries"]
    unloaded = lora("unload-me", 400, lifecycle_adapters["small"][1])
    generate(llm, [unloaded])
    generate(llm, [None])
    loaded = last_step(llm)
    assert loaded["cached_adapters"] == before["cached_adapters"] + 1
    assert llm.llm_engine.remove_lora(400)
    generate(llm, [None])
    after = last_step(llm)
    assert after["cached_adapters"] == before["cached_adapters"]
    assert after["cached_adapter_blocks"] == before["cached_adapter_blocks"]
    assert llm.collective_rpc("slora_info")[0]["host_cache"]["entries"] <= entries_before


def test_swapped_files_fail_only_their_requests_tp2(tiny_model, lifecycle_adapters, tmp_path, monkeypatch):
    # Item 4 at TP=2: every rank agrees on the failure; the engine serves on.
    previous = os.environ.get(trace.TRACE_ENV)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = engine(tiny_model, tmp_path / "trace.jsonl", tp=2)
    try:
        swap_and_check(llm, tiny_model, lifecycle_adapters, tmp_path, base_id=500)
    finally:
        close_llm(llm)
        os.environ[trace.TRACE_ENV] = previous or ""
