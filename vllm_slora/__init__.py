"""vllm-slora: serve thousands of LoRA adapters from one vLLM engine.

vLLM calls `register()` (entry point `vllm.general_plugins: slora`) in every process it
starts: the API server or `LLM` process, EngineCore, every worker. Importing this package
never imports vLLM; `register()` imports lazily and is idempotent. Installed but not
enabled, vLLM behaves exactly as stock: the only thing `register()` changes is to make
config creation look for an `additional_config["slora"]` section.
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Entry point for `vllm.general_plugins`. Safe to call any number of times."""
    global _registered
    from vllm_slora import trace

    trace.record("plugin_loaded")
    if _registered:
        return
    _registered = True

    from vllm_slora.patches import apply_patches

    apply_patches()
