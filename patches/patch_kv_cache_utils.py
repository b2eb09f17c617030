"""Make prefix-cache block hashes depend on the adapter's *files*, not only its name.

Stock `_gen_lora_extra_hash_keys` (vllm/v1/core/kv_cache_utils.py:578) keys LoRA blocks
on (name, path). An adapter re-loaded in place under the same name and path
(`load_inplace`, a finetuning job publishing a new version) then hits KV computed with
the old weights (vLLM issues #30931, #42125). We add the identity of the weight and
config files (inode, size, mtime), so new files mean new hashes.

When the identity is read (never per block, never per ordinary request):

* first sight of a (name, path): read once and kept (`AdapterFilesIdentity`). Later
  requests reuse it without touching the disk, so moving or deleting the directory of a
  loaded adapter changes nothing here.
* a request whose LoRARequest has `load_inplace=True`: read once for that request (the
  value is kept on the Request, so all its blocks, decode blocks included, hash alike)
  and it replaces the kept identity. If the files are gone, the kept identity stays.

Why not only "on the explicit reload": EngineCore cannot tell one. vLLM's contract for
`load_inplace` is per request ("forces reloading the adapter", LoRARequest docstring):
`LLM.generate(..., lora_request=LoRARequest(..., load_inplace=True))` reloads with no
other call, and the OpenAI server keeps the LoRARequest of `/v1/load_lora_adapter`
(load_inplace=True) for every later request of that adapter, so a second reload looks
exactly like the requests after the first. The scheduler re-registers the adapter on the
same flag (vllm_slora/scheduler.py `_slora_spec`), so refreshing on it keeps the hash in
step with the weights actually served; it costs three `stat` calls per such request, and
only for adapters that were reloaded in place. Adapters never reloaded in place are not
statted again after their first request.

Applied only by vllm-slora's scheduler (EngineCore process of an engine with the
`slora` key), so stock engines hash exactly as before. See PATCHES in __init__.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

_ORIGINAL_ATTR = "_vllm_slora_original"
_REQUEST_ATTR = "_vllm_slora_lora_files"
_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def adapter_fingerprint(path: str) -> str:
    """Identity of the adapter files at `path` ("" if none); changes whenever they are rewritten."""
    parts = []
    for name in _FILES:
        try:
            st = os.stat(os.path.join(path, name))
        except (OSError, ValueError):  # ValueError: a NUL byte in the path
            continue
        parts.append(f"{name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


class AdapterFilesIdentity:
    """(name, path) -> file identity captured at first sight or at an in-place reload."""

    def __init__(self, max_entries: int = 1 << 16) -> None:
        self._known: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()
        self._max_entries = max_entries

    def of(self, lora_request, *, refresh: bool = False) -> str:
        key = (lora_request.lora_name, lora_request.lora_path)
        with self._lock:
            known = self._known.get(key)
            if known is not None and not refresh:
                self._known.move_to_end(key)
                return known
        current = adapter_fingerprint(lora_request.lora_path)
        if not current and known is not None:
            return known  # files gone (moved / deleted): the weights loaded from them still serve
        with self._lock:
            if current:  # nothing there: the request fails elsewhere; capture it once it exists
                self._known[key] = current
                self._known.move_to_end(key)
                while len(self._known) > self._max_entries:
                    self._known.popitem(last=False)
        return current

    def forget(self, name: str, path: str) -> None:
        """For the scheduler, when it serves other files for (name, path) than those it had
        registered (files replaced with no reload): requests created afterwards read the
        identity again, so they never hash like KV computed with the old weights."""
        with self._lock:
            self._known.pop((name, path), None)

    def for_request(self, request) -> str:
        """The identity one request hashes all its blocks with (computed once per request)."""
        cached = getattr(request, _REQUEST_ATTR, None)
        if cached is not None:
            return cached
        lora = request.lora_request
        identity = self.of(lora, refresh=bool(getattr(lora, "load_inplace", False)))
        try:
            setattr(request, _REQUEST_ATTR, identity)
        except AttributeError:  # an object that takes no attributes: the kept identity serves
            pass
        return identity


IDENTITY = AdapterFilesIdentity()


def rehash_request(request) -> None:
    """Compute a waiting request's block hashes again after its adapter was changed (the
    scheduler gives it a newer published version, vllm_slora/finetune/published_versions.py).

    Only for a request with no computed tokens: none of its blocks is in use yet.
    """
    try:
        delattr(request, _REQUEST_ATTR)
    except AttributeError:
        pass
    request.block_hashes = []
    request.update_block_hashes()


def apply() -> None:
    from vllm_slora.compat import kv_cache_utils

    current = kv_cache_utils._gen_lora_extra_hash_keys
    if hasattr(current, _ORIGINAL_ATTR):
        return

    def _gen_lora_extra_hash_keys(request):
        keys = current(request)
        if request.lora_request:
            keys = [*keys, ("lora_files", IDENTITY.for_request(request))]
        return keys

    setattr(_gen_lora_extra_hash_keys, _ORIGINAL_ATTR, current)
    kv_cache_utils._gen_lora_extra_hash_keys = _gen_lora_extra_hash_keys
