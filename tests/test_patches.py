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
    assert patch.when in ("register", "slora_scheduler", "install")
    module = importlib.import_module(f"vllm_slora.patches.{patch.module}")
    assert module.__doc__
    if patch.when == "install":
        assert hasattr(module, "ensure_alias")
    else:
        assert callable(module.apply)


def test_lora_block_hash_changes_when_adapter_files_are_rewritten(tmp_path):
    from vllm.v1.core import kv_cache_utils

    from vllm_slora.patches import patch_kv_cache_utils

    original = kv_cache_utils._gen_lora_extra_hash_keys
    patch_kv_cache_utils.apply()
    patch_kv_cache_utils.apply()  # idempotent
    try:
        weights = tmp_path / "adapter_model.safetensors"
        weights.write_bytes(b"old weights")
        (tmp_path / "adapter_config.json").write_text("{}")
        lora = SimpleNamespace(lora_name="a", lora_path=str(tmp_path), lora_int_id=1)
        request = SimpleNamespace(lora_request=lora)
        before = kv_cache_utils._gen_lora_extra_hash_keys(request)
        assert before[0] == ("lora", "a", str(tmp_path))  # stock keys are kept
        assert kv_cache_utils._gen_lora_extra_hash_keys(request) == before  # stable
        time.sleep(0.01)
        weights.write_bytes(b"new weights!")
        os.utime(weights)
        assert kv_cache_utils._gen_lora_extra_hash_keys(request) != before
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
        def problem(self, probe):
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
    fake = SimpleNamespace(static_lora_modules=lora_modules, engine_client=SimpleNamespace(vllm_config=None))
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
