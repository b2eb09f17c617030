"""Validate adapters in vLLM's per-request LoRA check.

`InputProcessor._validate_lora` (vllm/v1/engine/input_processor.py:278) only checks that
LoRA is enabled. For engines with the `slora` key we also validate the adapter files
against the base model (vllm_slora/frontend_validation.py) and raise vLLM's own
exceptions, with vLLM's status codes in the OpenAI server: `VLLMNotFoundError` (404,
stock's code for a missing adapter) when there is no adapter at the path,
`VLLMValidationError` (400) for any other problem; `LLM` raises them. InputProcessor is
built inside LLMEngine/AsyncLLM, so it cannot be subclassed from outside. See PATCHES
in __init__.
"""

from __future__ import annotations

_ORIGINAL_ATTR = "_vllm_slora_original"


def apply() -> None:
    from vllm_slora.compat import InputProcessor, VLLMNotFoundError, VLLMValidationError

    current = InputProcessor._validate_lora
    if hasattr(current, _ORIGINAL_ATTR):
        return

    def _validate_lora(self, lora_request) -> None:
        current(self, lora_request)
        if lora_request is None:
            return
        from vllm_slora.adapters import AdapterNotFoundError
        from vllm_slora.frontend_validation import validator_for

        validator = validator_for(self.vllm_config)
        problem = validator.problem(lora_request) if validator else None
        if isinstance(problem, AdapterNotFoundError):
            raise VLLMNotFoundError(str(problem))
        if problem is not None:
            raise VLLMValidationError(str(problem), parameter="lora_request")

    setattr(_validate_lora, _ORIGINAL_ATTR, current)
    InputProcessor._validate_lora = _validate_lora
