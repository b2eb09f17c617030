"""Patch `EngineArgs.create_engine_config` so the `slora` key switches the plugin on.

See PATCHES in this package's __init__ for why / how / removal plan.
"""

from __future__ import annotations

import functools

_ORIGINAL_ATTR = "_vllm_slora_original"


def apply() -> None:
    from vllm_slora.compat import EngineArgs

    current = EngineArgs.create_engine_config
    if hasattr(current, _ORIGINAL_ATTR):
        return  # already wrapped in this process

    @functools.wraps(current)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = current(self, *args, **kwargs)
        from vllm_slora.activation import activate_if_requested

        activate_if_requested(vllm_config, requested_compile_mode=_requested_mode(self))
        return vllm_config

    setattr(create_engine_config, _ORIGINAL_ATTR, current)
    EngineArgs.create_engine_config = create_engine_config


def _requested_mode(engine_args):
    """The compilation mode the user set on the command line / in LLM(), or None."""
    config = getattr(engine_args, "compilation_config", None)
    if isinstance(config, dict):
        return config.get("mode")
    return getattr(config, "mode", None)


def revert() -> None:
    from vllm_slora.compat import EngineArgs

    wrapped = EngineArgs.create_engine_config
    original = getattr(wrapped, _ORIGINAL_ATTR, None)
    if original is not None:
        EngineArgs.create_engine_config = original
