"""Make `/v1/unload_lora_adapter` reach the engine; answer `/v1/load_lora_adapter` with a 4xx and the reason for a bad adapter; refuse
bad `--lora-modules` at start-up in one line.

`OpenAIServingModels.load_lora_adapter` (vllm/entrypoints/openai/models/serving.py:167)
turns any failure of the engine-side load into HTTP 500 "InternalServerError" (404 for a
missing adapter). For engines with the `slora` key we validate the adapter first
(config, weight-file header and values, vllm_slora/frontend_validation.py; always
against the files as they are now: an explicit load is the moment files are checked,
requests afterwards trust it) in a worker thread, so a slow disk or a hostile config never stalls the event loop, and answer
404 NotFoundError when there is no adapter at the path (stock's code and phrase "No
adapter found for") or 400 BadRequestError naming the adapter and the problem (the
code vLLM's own LoRA server tests expect); the engine is never asked to load it. An
engine-side load that still fails with an adapter error is answered 400 too.

`init_static_loras` (same file) raises ValueError for the first bad `--lora-modules`
entry, which vLLM prints as a traceback; for `slora` engines it becomes one line
("vllm-slora: cannot start: LoRA adapter 'x': ...") and exit status 1. See PATCHES in
__init__.
"""

from __future__ import annotations

from http import HTTPStatus

_ORIGINAL_ATTR = "_vllm_slora_original"


def error_response(problem):
    """vLLM's ErrorResponse for an AdapterError (404 when there is no adapter, else 400)."""
    from vllm_slora.adapters import AdapterNotFoundError
    from vllm_slora.compat import create_error_response

    if isinstance(problem, AdapterNotFoundError):
        return create_error_response(str(problem), err_type="NotFoundError", status_code=HTTPStatus.NOT_FOUND)
    return create_error_response(str(problem), param="lora_path")


def apply() -> None:
    from vllm_slora.compat import OpenAIServingModels

    current = OpenAIServingModels.load_lora_adapter
    if hasattr(current, _ORIGINAL_ATTR):
        return
    current_init = OpenAIServingModels.init_static_loras

    async def load_lora_adapter(self, request, base_model_name=None):
        import asyncio

        from vllm_slora.frontend_validation import validator_for

        validator = validator_for(self.engine_client.vllm_config)
        if validator is None or not (request.lora_name and request.lora_path):
            return await current(self, request, base_model_name)
        probe = _Probe(request.lora_name, request.lora_path)
        # An explicit (re)load: checked against the files as they are now, even when the
        # same name and path passed before (requests then trust that check).
        problem = await asyncio.to_thread(validator.problem, probe, reload=True)
        if problem is not None:
            return error_response(problem)
        result = await current(self, request, base_model_name)
        loaded = self.lora_requests.get(request.lora_name)
        if isinstance(result, str) and loaded is not None:
            validator.accept(loaded)  # the object later requests carry: already checked
        error = getattr(result, "error", None)
        if error is not None and error.code == HTTPStatus.INTERNAL_SERVER_ERROR and (
            f"LoRA adapter {request.lora_name!r}:" in (error.message or "")
        ):
            # The engine refused it (e.g. files changed since the check above).
            from vllm_slora.compat import create_error_response

            return create_error_response(error.message, param="lora_path")
        return result

    async def init_static_loras(self):
        from vllm_slora.frontend_validation import validator_for

        if validator_for(self.engine_client.vllm_config) is None:
            return await current_init(self)
        from vllm_slora.patches import apply_patches

        apply_patches("slora_server")  # API server of a slora engine, before any request
        try:
            return await current_init(self)
        except ValueError as exc:  # the ErrorResponse of one --lora-modules entry
            raise SystemExit(f"vllm-slora: cannot start: {exc}") from None

    current_unload = OpenAIServingModels.unload_lora_adapter

    async def unload_lora_adapter(self, request):
        from vllm_slora.frontend_validation import validator_for

        known = self.lora_requests.get(request.lora_name)
        result = await current_unload(self, request)
        validator = validator_for(self.engine_client.vllm_config)
        if known is not None and isinstance(result, str) and validator is not None:
            # Stock only forgets the name here; the engine keeps every copy. Tell it.
            validator.forget(known.lora_name, known.lora_path)
            await self.engine_client.remove_lora(known.lora_int_id)
        return result

    setattr(load_lora_adapter, _ORIGINAL_ATTR, current)
    setattr(init_static_loras, _ORIGINAL_ATTR, current_init)
    setattr(unload_lora_adapter, _ORIGINAL_ATTR, current_unload)
    OpenAIServingModels.load_lora_adapter = load_lora_adapter
    OpenAIServingModels.init_static_loras = init_static_loras
    OpenAIServingModels.unload_lora_adapter = unload_lora_adapter


class _Probe:
    """The two fields of a LoRARequest the validator reads."""

    def __init__(self, lora_name: str, lora_path: str) -> None:
        self.lora_name = lora_name
        self.lora_path = lora_path
