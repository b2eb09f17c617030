"""LoRA adapters on disk: validation, specs, weight loading, synthetic generation.

Imports torch, safetensors and the standard library only (never vLLM), so the
scheduler process and tests can use it without an engine.

    base = BaseModelShape.from_hf_config("/models/smollm2/config.json")
    registry = AdapterRegistry(base, max_lora_rank=64, page_elems=8192, pool_blocks=4096)
    spec = registry.register("sql", "/adapters/sql")      # metadata + header only
    blocks = spec.blocks_needed(page_elems=8192)
    weights = load_adapter_weights(spec)                   # tensors, scaling separate
    rows = weights.page_matrices(layer=0)                  # == spec.layer_matrices(0)
"""

from .base_model import BaseModelShape, ShardShape
from .errors import AdapterError, AdapterNotFoundError
from .loading import AdapterWeights, SliceWeights, check_adapter_weights, load_adapter_weights
from .modules import PACKED_MODULES, SLICE_ORDER
from .peft_config import LoraHyperparams, parse_lora_config
from .registry import AdapterRegistry
from .spec import AdapterSpec, SliceSpec
from .validation import inspect_adapter

__all__ = [
    "AdapterError",
    "AdapterNotFoundError",
    "AdapterRegistry",
    "AdapterSpec",
    "AdapterWeights",
    "BaseModelShape",
    "check_adapter_weights",
    "GeneratedAdapter",
    "LoraHyperparams",
    "PACKED_MODULES",
    "SLICE_ORDER",
    "ShardShape",
    "SliceSpec",
    "SliceWeights",
    "generate_adapters",
    "inspect_adapter",
    "load_adapter_weights",
    "parse_lora_config",
]


def __getattr__(name: str):
    # Imported on first use so `python -m vllm_slora.adapters.generate` does not find
    # the module already loaded by its own package (runpy warns about that).
    if name in ("generate_adapters", "GeneratedAdapter"):
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
