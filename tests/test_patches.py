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
