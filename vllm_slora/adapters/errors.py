"""The one exception every adapter problem is reported with."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the adapter and the problem.

    The OpenAI server answers it with HTTP 400 (`AdapterNotFoundError`: 404), the
    status codes stock vLLM uses for the same cases.
    """

    def __init__(self, adapter_name: str, problem: str) -> None:
        self.adapter_name = adapter_name
        self.problem = problem
        super().__init__(f"LoRA adapter {adapter_name!r}: {problem}")

    def __reduce__(self):  # keep the subclass and both fields across processes
        return type(self), (self.adapter_name, self.problem)


class AdapterNotFoundError(AdapterError):
    """No adapter at the given path (no directory or no adapter_config.json there).

    The message carries stock vLLM's phrase "No adapter found for <path>" and says the
    same whether or not the path exists, so it reveals nothing about the server's files.
    """

    def __init__(self, adapter_name: str, path: str) -> None:
        self.path = path
        super().__init__(adapter_name, f"No adapter found for {path} (it does not exist or has no adapter_config.json)")

    def __reduce__(self):
        return type(self), (self.adapter_name, self.path)
