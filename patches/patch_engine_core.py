"""Tell vllm-slora's scheduler when an adapter is unloaded.

`EngineCore.remove_lora` (vllm/v1/engine/core.py:1054) only forwards to the workers, so
the scheduler, which owns adapter pages in the KV pool, never learns that an adapter is
gone: its pages, spec and registry entry would stay for ever (6,000 unloads = 6,000
cached adapters). We call the scheduler's `slora_unload` first, then the original.

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
