"""The one exception every adapter problem is reported with."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the adapter and the problem."""

    def __init__(self, adapter_name: str, problem: str) -> None:
        self.adapter_name = adapter_name
        self.problem = problem
        super().__init__(f"LoRA adapter {adapter_name!r}: {problem}")
