"""Answer `/v1/load_lora_adapter` with HTTP 400 and the reason for a bad adapter.

`OpenAIServingModels.load_lora_adapter` (vllm/entrypoints/openai/models/serving.py:167)
turns any failure of the engine-side load into HTTP 500 "InternalServerError". For
engines with the `slora` key we validate the adapter first (config + weight-file header,
vllm_slora/frontend_validation.py) and return a 400 that names the adapter and the
problem; the engine is never asked to load it. See PATCHES in __init__.
"""

from __future__ import annotations

_ORIGINAL_ATTR = "_vllm_slora_original"


def apply() -> None:
    from vllm_slora.compat import OpenAIServingModels, create_error_response

    current = OpenAIServingModels.load_lora_adapter
    if hasattr(current, _ORIGINAL_ATTR):
        return

    async def load_lora_adapter(self, request, base_model_name=None):
        from vllm_slora.frontend_validation import validator_for

        validator = validator_for(self.engine_client.vllm_config)
        if validator is not None and request.lora_name and request.lora_path:
            probe = _Probe(request.lora_name, request.lora_path)
            problem = validator.problem(probe)
            if problem:
                return create_error_response(problem, param="lora_path")
        return await current(self, request, base_model_name)

    setattr(load_lora_adapter, _ORIGINAL_ATTR, current)
    OpenAIServingModels.load_lora_adapter = load_lora_adapter


class _Probe:
    """The two fields of a LoRARequest the validator reads."""

    def __init__(self, lora_name: str, lora_path: str) -> None:
        self.lora_name = lora_name
        self.lora_path = lora_path
