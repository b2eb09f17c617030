"""Serve adapters from the `slora` key's `adapter_dirs` on first request, with no env var.

`BaseServing._check_model` (vllm/entrypoints/serve/engine/serving.py:49) answers 404 for
a `model` that is neither a served base model nor a loaded adapter; it asks vLLM's LoRA
resolvers only when `VLLM_ALLOW_RUNTIME_LORA_UPDATING` is set, and those resolvers come
from plugins that are loaded only when `VLLM_PLUGINS` names them, which switches off
every plugin it does not name, vllm-slora included (issue #9 item 8). BaseServing and
its subclasses are built by vLLM's api_server, so they cannot be subclassed from
outside.

For servers whose engine has `adapter_dirs` in its `slora` key, the wrapper first looks
the name up in those directories and loads it (vllm_slora/adapter_sources.py: path
checks, validation, the usual load path), then runs the original check, which now finds
the adapter loaded. Other servers, names that are base models or loaded adapters, and
names found in no directory go straight to the original. Pooling endpoints override
`_check_model` (vllm/entrypoints/pooling/base/serving.py) and are not covered.

Applied when the OpenAI server of an engine with the `slora` key starts (from the
`init_static_loras` wrapper in patch_serving_models.py, before any request), not at
plugin registration: importing BaseServing would cost every other vLLM process (EngineCore,
workers, `LLM`) 0.3 s. See PATCHES in __init__.
"""

from __future__ import annotations

import functools

_ORIGINAL_ATTR = "_vllm_slora_original"


def apply() -> None:
    from vllm_slora.compat import BaseServing

    current = BaseServing._check_model
    if hasattr(current, _ORIGINAL_ATTR):
        return

    @functools.wraps(current)
    async def _check_model(self, request):
        name = getattr(request, "model", None)
        models = self.models
        if name and not models.is_base_model(name) and name not in models.lora_requests:
            from vllm_slora.adapter_sources import sources_for

            sources = sources_for(models)
            if sources is not None:
                error = await sources.load(models, name)
                if error is not None:
                    if self.request_logger is not None:
                        self.request_logger.log_request_body(request)
                    return error
        return await current(self, request)

    setattr(_check_model, _ORIGINAL_ATTR, current)
    BaseServing._check_model = _check_model
