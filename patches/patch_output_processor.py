"""Give a request that vllm-slora's engine failed its reason, not "Internal server error".

When the workers cannot put an adapter into pool pages (files changed behind the
engine's back, unreadable on one TP rank), the scheduler fails only that adapter's
requests: vLLM finishes them with FinishReason.ERROR, and the plugin puts the reason
(adapter, problem, TP rank) into the output's `stop_reason`. vLLM's OpenAI server then
raises `GenerationError("Internal server error")` from `_raise_if_error`
(vllm/entrypoints/generate/base/serving.py:200), which only sees the finish reason.

`RequestState._new_completion_output` (vllm/v1/engine/output_processor.py:428) is
wrapped so such an output's finish reason is an `AdapterFailure`: a str equal to
"error" (every caller sees what it saw before) that also carries the message, and
`GenerateBaseServing._raise_if_error` raises GenerationError with that message
(HTTP 500, the adapter and the problem named). Outputs of stock engines never carry a
LoRA-adapter stop_reason, so they are untouched. See PATCHES in __init__.
"""

from __future__ import annotations

_ORIGINAL_ATTR = "_vllm_slora_original"
# AdapterError messages start so (vllm_slora/adapters/errors.py).
_ADAPTER_MESSAGE = "LoRA adapter "


class AdapterFailure(str):
    """The finish reason "error", carrying why an adapter's request failed."""

    message: str

    def __new__(cls, message: str) -> AdapterFailure:
        reason = super().__new__(cls, "error")
        reason.message = message
        return reason


def apply() -> None:
    from vllm_slora.compat import GenerateBaseServing, GenerationError, RequestState

    current = RequestState._new_completion_output
    if hasattr(current, _ORIGINAL_ATTR):
        return
    current_raise = GenerateBaseServing._raise_if_error

    def _new_completion_output(self, token_ids, finish_reason, stop_reason):
        output = current(self, token_ids, finish_reason, stop_reason)
        if (output.finish_reason == "error" and isinstance(output.stop_reason, str)
                and output.stop_reason.startswith(_ADAPTER_MESSAGE)):
            output.finish_reason = AdapterFailure(output.stop_reason)
        return output

    def _raise_if_error(self, finish_reason, request_id):
        if isinstance(finish_reason, AdapterFailure):
            raise GenerationError(finish_reason.message)
        return current_raise(self, finish_reason, request_id)

    setattr(_new_completion_output, _ORIGINAL_ATTR, current)
    setattr(_raise_if_error, _ORIGINAL_ATTR, current_raise)
    RequestState._new_completion_output = _new_completion_output
    GenerateBaseServing._raise_if_error = _raise_if_error
