"""Make prefix-cache block hashes depend on the adapter's *files*, not only its name.

Stock `_gen_lora_extra_hash_keys` (vllm/v1/core/kv_cache_utils.py:578) keys LoRA blocks
on (name, path). An adapter re-loaded in place under the same name and path
(`load_inplace`, a finetuning job publishing a new version) then hits KV computed with
the old weights (vLLM issues #30931, #42125). We add a fingerprint of the weight and
config files (inode, size, mtime), so new files mean new hashes.

Applied only by vllm-slora's scheduler (EngineCore process of an engine with the
`slora` key), so stock engines hash exactly as before. See PATCHES in __init__.
"""

from __future__ import annotations

import os

_ORIGINAL_ATTR = "_vllm_slora_original"
_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def adapter_fingerprint(path: str) -> str:
    """Identity of the adapter files at `path`; changes whenever they are rewritten."""
    parts = []
    for name in _FILES:
        try:
            st = os.stat(os.path.join(path, name))
        except OSError:
            continue
        parts.append(f"{name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def apply() -> None:
    from vllm_slora.compat import kv_cache_utils

    current = kv_cache_utils._gen_lora_extra_hash_keys
    if hasattr(current, _ORIGINAL_ATTR):
        return

    def _gen_lora_extra_hash_keys(request):
        keys = current(request)
        lora = request.lora_request
        if lora:
            keys = [*keys, ("lora_files", adapter_fingerprint(lora.lora_path))]
        return keys

    setattr(_gen_lora_extra_hash_keys, _ORIGINAL_ATTR, current)
    kv_cache_utils._gen_lora_extra_hash_keys = _gen_lora_extra_hash_keys
