"""The patch registry is complete, and each patch does what its entry says."""

from __future__ import annotations

import importlib
import os
import time
from types import SimpleNamespace

import pytest

from vllm_slora.patches import PATCHES


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.module)
def test_every_patch_is_documented_and_loadable(patch):
    assert patch.target and len(patch.why) > 40 and len(patch.how) > 40 and patch.removal
    assert patch.when in ("register", "slora_scheduler", "slora_server", "slora_finetune", "install")
    module = importlib.import_module(f"vllm_slora.patches.{patch.module}")
    assert module.__doc__
    if patch.when == "install":
        assert hasattr(module, "ensure_alias")
    else:
        assert callable(module.apply)


def test_lora_block_hash_follows_in_place_reloads_and_reads_files_once(tmp_path, monkeypatch):
    """Files are statted at first sight and for load_inplace requests (once each), never per
    block; a rewrite reaches the hash through load_inplace; a moved directory changes nothing."""
    from vllm.v1.core import kv_cache_utils

    from vllm_slora.patches import patch_kv_cache_utils

    original = kv_cache_utils._gen_lora_extra_hash_keys
    monkeypatch.setattr(patch_kv_cache_utils, "IDENTITY", patch_kv_cache_utils.AdapterFilesIdentity())
    patch_kv_cache_utils.apply()
    patch_kv_cache_utils.apply()  # idempotent
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(patch_kv_cache_utils.os, "stat", lambda *a, **k: stats.append(a[0]) or real_stat(*a, **k))
    try:
        served = tmp_path / "served"
        served.mkdir()
        weights = served / "adapter_model.safetensors"
        weights.write_bytes(b"old weights")
        (served / "adapter_config.json").write_text("{}")

        def request(load_inplace=False):
            lora = SimpleNamespace(lora_name="a", lora_path=str(served), lora_int_id=1, load_inplace=load_inplace)
            return SimpleNamespace(lora_request=lora)

        first = request()
        before = kv_cache_utils._gen_lora_extra_hash_keys(first)
        assert before[0] == ("lora", "a", str(served))  # stock keys are kept
        assert kv_cache_utils._gen_lora_extra_hash_keys(first) == before  # every block of the request
        assert kv_cache_utils._gen_lora_extra_hash_keys(request()) == before  # later requests
        assert len(stats) == 3  # the three file names, once
        time.sleep(0.01)
        weights.write_bytes(b"new weights!")
        os.utime(weights)
        assert kv_cache_utils._gen_lora_extra_hash_keys(request()) == before  # no reload asked: not read
        assert len(stats) == 3
        reload = request(load_inplace=True)
        after = kv_cache_utils._gen_lora_extra_hash_keys(reload)
        assert after != before and kv_cache_utils._gen_lora_extra_hash_keys(reload) == after
        assert len(stats) == 6  # once for the reloading request, not per block
        assert kv_cache_utils._gen_lora_extra_hash_keys(request()) == after  # kept for later requests
        served.rename(tmp_path / "moved")
        assert kv_cache_utils._gen_lora_extra_hash_keys(request()) == after
        assert kv_cache_utils._gen_lora_extra_hash_keys(request(load_inplace=True)) == after  # files gone: kept
        (tmp_path / "moved").rename(served)
        weights.write_bytes(b"replaced behind the engine's back")
        assert kv_cache_utils._gen_lora_extra_hash_keys(request()) == after
        patch_kv_cache_utils.IDENTITY.forget("a", str(served))  # the scheduler registered new files
        assert kv_cache_utils._gen_lora_extra_hash_keys(request()) not in (before, after)
        assert kv_cache_utils._gen_lora_extra_hash_keys(SimpleNamespace(lora_request=None)) == []
    finally:
        kv_cache_utils._gen_lora_extra_hash_keys = original


@pytest.fixture
def serving_models_patched(monkeypatch, tmp_path):
    """OpenAIServingModels patched, with a validator for a tiny base model (no engine)."""
    import threading

    from vllm_slora import frontend_validation
    from vllm_slora.adapters import AdapterError, BaseModelShape, generate_adapters, inspect_adapter
    from vllm_slora.compat import OpenAIServingModels
    from vllm_slora.patches import patch_serving_models

    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512)
    base = BaseModelShape.from_hf_config(tiny)
    threads = []

    class Validator:
        def problem(self, probe, reload=False):
            threads.append(threading.current_thread())
            try:
                inspect_adapter(probe.lora_name, probe.lora_path, base, max_lora_rank=4)
            except AdapterError as e:
                return e
            return None

    monkeypatch.setattr(frontend_validation, "validator_for", lambda _config: Validator())
    saved = OpenAIServingModels.load_lora_adapter, OpenAIServingModels.init_static_loras
    patch_serving_models.apply()
    try:
        (good,) = generate_adapters(tiny, tmp_path, 1, ranks=(8,))  # rank 8 > max_lora_rank 4
        yield OpenAIServingModels, good.path, threads
    finally:
        OpenAIServingModels.load_lora_adapter, OpenAIServingModels.init_static_loras = saved


def _fake_models(cls, lora_modules):
    fake = SimpleNamespace(static_lora_modules=lora_modules, engine_client=SimpleNamespace(vllm_config=None),
                           lora_requests={})
    fake.load_lora_adapter = lambda *a, **k: cls.load_lora_adapter(fake, *a, **k)
    return fake


def test_bad_lora_modules_stop_start_up_in_one_line(serving_models_patched):
    import asyncio

    cls, path, _ = serving_models_patched
    module = SimpleNamespace(name="too-big", path=path, base_model_name=None, is_3d_lora_weight=False)
    with pytest.raises(SystemExit) as exit_info:
        asyncio.run(cls.init_static_loras(_fake_models(cls, [module])))
    message = str(exit_info.value.code)
    assert message.startswith("vllm-slora: cannot start: LoRA adapter 'too-big': ")
    assert "is greater than max_lora_rank 4" in message and "\n" not in message


def test_load_lora_adapter_answers_stock_status_codes_off_the_event_loop(serving_models_patched, tmp_path):
    import asyncio
    import threading

    cls, path, threads = serving_models_patched
    fake = _fake_models(cls, None)

    def load(name, lora_path):
        request = SimpleNamespace(lora_name=name, lora_path=lora_path, load_inplace=False)
        return asyncio.run(cls.load_lora_adapter(fake, request))

    missing = load("ghost", str(tmp_path / "nowhere"))
    assert missing.error.code == 404 and missing.error.type == "NotFoundError"
    assert "'ghost'" in missing.error.message and "No adapter found for" in missing.error.message
    too_big = load("big", path)
    assert too_big.error.code == 400 and "LoRA rank 8 is greater than max_lora_rank 4" in too_big.error.message
    assert threads and all(t is not threading.main_thread() for t in threads)


def test_adapter_failure_reaches_the_client_with_its_reason():
    from vllm.exceptions import GenerationError

    from vllm_slora.compat import GenerateBaseServing
    from vllm_slora.patches import patch_output_processor
    from vllm_slora.patches.patch_output_processor import AdapterFailure

    patch_output_processor.apply()
    reason = AdapterFailure("LoRA adapter 'z': the adapter files at /a changed on disk (TP rank 1)")
    assert reason == "error" and reason.message.endswith("(TP rank 1)")
    with pytest.raises(GenerationError, match="'z'.*TP rank 1") as err:
        GenerateBaseServing._raise_if_error(None, reason, "req-1")
    assert err.value.status_code == 500
    with pytest.raises(GenerationError, match="Internal server error"):  # stock failures as before
        GenerateBaseServing._raise_if_error(None, "error", "req-2")
    GenerateBaseServing._raise_if_error(None, "stop", "req-3")
