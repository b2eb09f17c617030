"""Tell vllm-slora's scheduler when an adapter is unloaded; let clients drive its finetuning jobs.

`EngineCore.remove_lora` (vllm/v1/engine/core.py:1054) only forwards to the workers, so
the scheduler, which owns adapter pages in the KV pool, never learns that an adapter is
gone: its pages, spec and registry entry would stay for ever (6,000 unloads = 6,000
cached adapters). We call the scheduler's `slora_unload` first, then the original.

Co-served finetuning jobs live in the scheduler too (finetune/coserve_planner.py), and
EngineCore utility calls only reach EngineCore methods: `slora_finetune(action, payload)`
is added, forwarding to the scheduler's `slora_finetune` (an error naming the problem on
engines without it). Its first call also hands the scheduler the EngineCore's input queue,
so that training steps end early when a request arrives (finetune/arrivals.py): the
engine object is not otherwise reachable from the scheduler.

Applied by SLoRAScheduler.__init__ (EngineCore of engines with the `slora` key); the
wrapper checks for the method, so other engines in the process are untouched. See
PATCHES in __init__.
"""

from __future__ import annotations

_ORIGINAL_ATTR = "_vllm_slora_original"


def apply() -> None:
    from vllm_slora.compat import EngineCore

    current = EngineCore.remove_lora
    if hasattr(current, _ORIGINAL_ATTR):
        return

    def remove_lora(self, lora_id: int) -> bool:
        unload = getattr(self.scheduler, "slora_unload", None)
        known = unload(lora_id) if unload is not None else False
        return current(self, lora_id) or known

    setattr(remove_lora, _ORIGINAL_ATTR, current)
    EngineCore.remove_lora = remove_lora
    EngineCore.slora_finetune = slora_finetune


def slora_finetune(self, action: str, payload: dict) -> dict:
    """Utility-call target: a finetuning job action (submit / cancel / poll / stats)."""
    handler = getattr(self.scheduler, "slora_finetune", None)
    if handler is None:
        raise RuntimeError("this engine does not run vllm-slora's scheduler (no 'slora' key in additional_config)")
    input_queue = getattr(self, "input_queue", None)  # EngineCoreProc only (not in-process engines)
    watch = getattr(self.scheduler, "slora_watch_arrivals", None)
    if input_queue is not None and watch is not None:
        watch(input_queue)
    return handler(action, payload)
