"""Reject a bad adapter where the request enters vLLM, with a message naming it.

Runs in the API server / `LLM` process from vLLM's own per-request LoRA check
(`InputProcessor._validate_lora`, patched in patches/patch_input_processor.py) and from
`/v1/load_lora_adapter` (patches/patch_serving_models.py, off the event loop). A bad
adapter then fails *its* request with a 4xx before it reaches the engine, and every
other request goes on.

Checked: the config and weight-file header (`inspect_adapter`, bounded in time) and,
once, every weight value (NaN / Inf, also after conversion to the model's dtype).

When the disk is read: at the first request of a (name, path), and at every explicit
(re)load: `/v1/load_lora_adapter` (with or without `load_inplace`), or a request whose
LoRARequest asks for `load_inplace` and is not the object already checked (offline
`LLM.generate(..., LoRARequest(..., load_inplace=True))`; the server reuses one object
per load, so its later requests are not re-checked). Once an adapter passed, its later
requests touch no file: weights that are resident keep serving if the directory is
moved or deleted, as in stock vLLM. A check that failed is not remembered as passed, so
a bad adapter is looked at again by its next request (one `stat` per file while its
files are unchanged: results are cached per file fingerprint), and a failed explicit
reload makes the adapter unchecked again.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from functools import lru_cache

from vllm_slora.adapters import AdapterError, check_adapter_weights, inspect_adapter
from vllm_slora.adapters.base_model import BaseModelShape
from vllm_slora.compat import kv_cache_dtype_str_to_dtype
from vllm_slora.config import SLoRAConfig
from vllm_slora.patches.patch_kv_cache_utils import adapter_fingerprint
from vllm_slora.pool import admission
from vllm_slora.pool.geometry import kv_page_bytes, page_elems

# (name, path) pairs remembered as checked; beyond this the least recently used one is
# checked again at its next request (a stat, or a full read if its result left the cache).
MAX_CHECKED = 1 << 16


class AdapterValidator:
    """Checks adapters against one engine's base model, rank limit and pool."""

    def __init__(self, vllm_config, slora: SLoRAConfig) -> None:
        model = vllm_config.model_config
        self.base = BaseModelShape.from_hf_config(model.hf_config.to_dict())
        self.dtype = model.dtype  # what the weights are converted to in the pool
        self.max_lora_rank = vllm_config.lora_config.max_lora_rank
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.allow_pickle = slora.allow_pickle_adapters
        # Not the VllmConfig itself: validators are freed with it (see validator_for).
        self._model_config = model
        self._cache_config = vllm_config.cache_config
        self._check = lru_cache(maxsize=4096)(self._check_uncached)
        # (name, path) -> None, or the last load_inplace LoRARequest checked for it.
        self._checked: OrderedDict[tuple[str, str], object] = OrderedDict()
        # (name, path) -> ((page elems, pool blocks), the adapter's blocks): never_fits
        # reads no file while the request fits by this count.
        self._known_blocks: dict[tuple[str, str], tuple[tuple, int]] = {}
        self._lock = threading.Lock()

    def _pool_geometry(self) -> tuple[int | None, int | None]:
        """(page elements per TP rank, usable blocks), once the engine reported them."""
        cache = self._cache_config
        if not cache.num_gpu_blocks:
            return None, None
        kv_heads = max(1, self.base.num_kv_heads // self.tp_size)
        kv_dtype = kv_cache_dtype_str_to_dtype(cache.cache_dtype, self._model_config)
        page_bytes = kv_page_bytes(cache.block_size, kv_heads, self.base.head_dim, kv_dtype.itemsize)
        return page_elems(page_bytes, self.dtype), cache.num_gpu_blocks - 1

    def _check_uncached(self, name: str, path: str, fingerprint: str) -> AdapterError | None:
        page_elems, pool_blocks = self._pool_geometry()
        try:
            spec = inspect_adapter(
                name, path, self.base, max_lora_rank=self.max_lora_rank, page_elems=page_elems,
                pool_blocks=pool_blocks, tp_size=self.tp_size, allow_pickle=self.allow_pickle,
            )
            check_adapter_weights(spec, self.dtype)
        except AdapterError as e:
            return e
        return None

    def problem(self, lora_request, *, reload: bool = False) -> AdapterError | None:
        """None if the adapter is servable, else the AdapterError saying why.

        ``reload``: an explicit (re)load, checked against the files as they are now.
        """
        key = (lora_request.lora_name, lora_request.lora_path)
        inplace = bool(getattr(lora_request, "load_inplace", False))
        if not reload:
            with self._lock:
                if key in self._checked and (not inplace or self._checked[key] is lora_request):
                    self._checked.move_to_end(key)
                    return None
        problem = self._check(key[0], key[1], adapter_fingerprint(key[1]))
        with self._lock:
            if problem is None:
                self._checked[key] = lora_request if inplace else None
                self._checked.move_to_end(key)
                while len(self._checked) > MAX_CHECKED:
                    self._checked.popitem(last=False)
            elif reload:
                self._checked.pop(key, None)
        return problem

    def forget(self, name: str, path: str) -> None:
        """The adapter was unloaded: its next load is checked afresh, nothing is kept."""
        with self._lock:
            self._checked.pop((name, path), None)
            self._known_blocks.pop((name, path), None)

    def accept(self, lora_request) -> None:
        """`lora_request` was just checked under another object (the server's load probe)."""
        key = (lora_request.lora_name, lora_request.lora_path)
        with self._lock:
            if key in self._checked:
                self._checked[key] = lora_request if getattr(lora_request, "load_inplace", False) else None

    def never_fits(self, lora_request, num_tokens: int) -> AdapterError | None:
        """The AdapterError for a request of `num_tokens` tokens that can never run beside
        its adapter in the pool (pool/admission.py), else None (also while the pool size is
        not known). For adapters `problem` passed.

        No file is touched while the adapter's last known block count says the request
        fits (the scheduler, which has the current count, refuses the rest); a refusal is
        confirmed against the files as they are now.
        """
        page_elems, pool_blocks = self._pool_geometry()
        if page_elems is None:
            return None
        name, path = lora_request.lora_name, lora_request.lora_path
        block_size = self._cache_config.block_size
        known = self._known_blocks
        geometry, blocks = known.get((name, path), (None, None))
        if geometry == (page_elems, pool_blocks) and (
            admission.never_fits(blocks, num_tokens, block_size, pool_blocks) is None
        ):
            return None
        try:
            spec = inspect_adapter(
                name, path, self.base, max_lora_rank=self.max_lora_rank, page_elems=page_elems,
                pool_blocks=pool_blocks, tp_size=self.tp_size, allow_pickle=self.allow_pickle,
            )
            blocks = spec.blocks_needed(page_elems, self.tp_size)
        except (AdapterError, ValueError):
            return None  # not servable any more: the scheduler refuses it with the reason
        with self._lock:
            if len(known) >= MAX_CHECKED:
                known.clear()
            known[(name, path)] = ((page_elems, pool_blocks), blocks)
        problem = admission.never_fits(blocks, num_tokens, block_size, pool_blocks)
        return None if problem is None else AdapterError(name, problem)


# id(VllmConfig) -> its validator (None: stock engine); an entry goes with its config.
_validators: dict[int, AdapterValidator | None] = {}


def validator_for(vllm_config) -> AdapterValidator | None:
    """The validator of an engine with the `slora` key, None for stock engines."""
    key = id(vllm_config)
    if key not in _validators:
        slora = SLoRAConfig.from_additional_config(vllm_config.additional_config)
        _validators[key] = AdapterValidator(vllm_config, slora) if slora is not None else None
        try:
            weakref.finalize(vllm_config, _validators.pop, key, None)
        except TypeError:  # not weak-referenceable (a stand-in config): kept for the process
            pass
    return _validators[key]
