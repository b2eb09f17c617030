"""Let the EngineCore and the worker sleep, not spin, while the other side works (CPU co-serving).

Why: vLLM's shared-memory message queues (vllm/distributed/device_communicators/
shm_broadcast.py, `SpinCondition.wait`) make a reader busy-loop on `sched_yield` for
`busy_loop_s` = 1 s after its last read, and only then block on a zmq notification. On a
CPU engine the worker computes with every core (one OpenMP thread per core) while the
EngineCore waits for its output: the EngineCore's spin takes one of those cores. Measured
on the 2-core CI machine during a co-served training step: EngineCore 93 % CPU, the
worker 100 % instead of 200 %, every training unit 1.7-1.9x slower than the same unit run
without the spin (fwd 19 vs 11 ms, bwd 55 vs 29 ms per layer on the default model).
Training steps are long (tens of ms of units after the inference), so the spin is pure loss.

How: wrap `SpinCondition.wait` so a reader spins at most `MAX_SPIN_S` after its last read,
then blocks on the notification the writer sends with every message (vLLM's own idle
path, unchanged). Applied with the `slora_finetune` patches (the worker of engines with
slora.finetune=true, and their scheduler in the EngineCore), on the CPU platform only.

Removal: when vLLM makes the spin window configurable (or adaptive to the step time).
"""

from __future__ import annotations

_ORIGINAL_ATTR = "_vllm_slora_original"
# Messages that come back faster than this (short inference-only steps) are still caught
# by spinning; anything slower is waited for without burning a core.
MAX_SPIN_S = 0.002


def apply() -> None:
    from vllm_slora.compat import current_platform, shm_spin_condition_cls

    if not current_platform.is_cpu():
        return
    spin_condition = shm_spin_condition_cls()
    current = spin_condition.wait
    if hasattr(current, _ORIGINAL_ATTR):
        return

    def wait(self, timeout_ms: int | None = None) -> None:
        if self.busy_loop_s > MAX_SPIN_S:
            self.busy_loop_s = MAX_SPIN_S
        return current(self, timeout_ms)

    setattr(wait, _ORIGINAL_ATTR, current)
    spin_condition.wait = wait
