"""Reject a bad adapter where the request enters vLLM, with a message naming it.

Runs in the API server / `LLM` process from vLLM's own per-request LoRA check
(`InputProcessor._validate_lora`, patched in patches/patch_input_processor.py) and from
`/v1/load_lora_adapter` (patches/patch_serving_models.py, off the event loop). A bad
adapter then fails *its* request with a 4xx before it reaches the engine, and every
other request goes on.

Checked: the config and weight-file header (`inspect_adapter`, bounded in time) and,
once, every weight value (NaN / Inf, also after conversion to the model's dtype).
Results are cached per adapter and file fingerprint, so a request costs one `stat` per
adapter file; the weights are read once per adapter version.
"""

from __future__ import annotations

from functools import lru_cache

from vllm_slora.adapters import AdapterError, check_adapter_weights, inspect_adapter
from vllm_slora.adapters.base_model import BaseModelShape
from vllm_slora.compat import kv_cache_dtype_str_to_dtype
from vllm_slora.config import SLoRAConfig
from vllm_slora.patches.patch_kv_cache_utils import adapter_fingerprint
from vllm_slora.pool.geometry import kv_page_bytes, page_elems


class AdapterValidator:
    """Checks adapters against one engine's base model, rank limit and pool."""

    def __init__(self, vllm_config, slora: SLoRAConfig) -> None:
        model = vllm_config.model_config
        self.base = BaseModelShape.from_hf_config(model.hf_config.to_dict())
        self.dtype = model.dtype  # what the weights are converted to in the pool
        self.max_lora_rank = vllm_config.lora_config.max_lora_rank
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.allow_pickle = slora.allow_pickle_adapters
        self._vllm_config = vllm_config
        self._check = lru_cache(maxsize=4096)(self._check_uncached)

    def _pool_geometry(self) -> tuple[int | None, int | None]:
        """(page elements per TP rank, usable blocks), once the engine reported them."""
        cache = self._vllm_config.cache_config
        if not cache.num_gpu_blocks:
            return None, None
        kv_heads = max(1, self.base.num_kv_heads // self.tp_size)
        kv_dtype = kv_cache_dtype_str_to_dtype(cache.cache_dtype, self._vllm_config.model_config)
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

    def problem(self, lora_request) -> AdapterError | None:
        """None if the adapter is servable, else the AdapterError saying why."""
        path = lora_request.lora_path
        return self._check(lora_request.lora_name, path, adapter_fingerprint(path))


_validators: dict[int, AdapterValidator | None] = {}


def validator_for(vllm_config) -> AdapterValidator | None:
    """The validator of an engine with the `slora` key, None for stock engines."""
    key = id(vllm_config)
    if key not in _validators:
        slora = SLoRAConfig.from_additional_config(vllm_config.additional_config)
        _validators[key] = AdapterValidator(vllm_config, slora) if slora is not None else None
    return _validators[key]
