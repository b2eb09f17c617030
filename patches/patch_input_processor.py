"""Validate adapters in vLLM's per-request LoRA check.

`InputProcessor._validate_lora` (vllm/v1/engine/input_processor.py:278) only checks that
LoRA is enabled. For engines with the `slora` key we also validate the adapter files
against the base model (vllm_slora/frontend_validation.py) and raise vLLM's own
exceptions, with vLLM's status codes in the OpenAI server: `VLLMNotFoundError` (404,
stock's code for a missing adapter) when there is no adapter at the path,
`VLLMValidationError` (400) for any other problem; `LLM` raises them. InputProcessor is
built inside LLMEngine/AsyncLLM, so it cannot be subclassed from outside. See PATCHES
in __init__.

`process_inputs` is wrapped too: a request whose adapter blocks plus prompt KV blocks
exceed the pool can never be scheduled and is refused there with a 400.
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
    _apply_pool_fit(InputProcessor, VLLMValidationError)


def _apply_pool_fit(InputProcessor, VLLMValidationError) -> None:
    """Refuse (400) a request that can never fit beside its adapter in the pool.

    `_validate_lora` does not see the prompt, so this wraps `process_inputs` (which
    `process_inputs_async` calls too): once the prompt is tokenized, an adapter's blocks
    plus the prompt's KV blocks must fit in the pool's usable blocks (pool/admission.py).
    The scheduler refuses one that gets past (finish_reason "error", the reason in
    stop_reason; the OpenAI server then answers 500), so this is where clients get a 400.
    """
    current = InputProcessor.process_inputs
    if hasattr(current, _ORIGINAL_ATTR):
        return

    def process_inputs(self, *args, **kwargs):
        request = current(self, *args, **kwargs)
        lora_request = request.lora_request
        if lora_request is None:
            return request
        from vllm_slora.frontend_validation import validator_for

        validator = validator_for(self.vllm_config)
        if validator is not None:
            tokens = request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt_embeds
            problem = validator.never_fits(lora_request, len(tokens) if tokens is not None else 0)
            if problem is not None:
                raise VLLMValidationError(str(problem), parameter="prompt")
        return request

    setattr(process_inputs, _ORIGINAL_ATTR, current)
    InputProcessor.process_inputs = process_inputs
