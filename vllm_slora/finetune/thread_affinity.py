"""Unpin the worker's OpenMP threads while an idle engine step trains, pin them back after.

vLLM's CPU worker pins each OpenMP thread to one core (VLLM_CPU_OMP_THREADS_BIND, default
"auto"), and every thread the worker starts afterwards inherits its main thread's core: in
a finetune worker here 46 of its 47 threads sat on core 0 and one OpenMP thread on core 1. That
protects inference (with another process computing beside the server, unpinned decodes
collapsed here: 8 concurrent decodes 15 vs 80 tok/s). But a parallel region waits for its
slowest thread, and a pinned thread cannot leave a core that another thread or process is
using at that moment, so training at full speed in an idle step ran ~10 % slower pinned.
Measured through `vllm serve` against the HF + PEFT loop in a process beside it (the bench's
job, 25 s windows alternated, 8-10 rounds): pinned 0.90x median, unpinned in idle steps
0.98x, the whole server unpinned (nobind) 1.01x. An earlier A/B of two windows each had
called this no gain and the change was reverted; the machine's drift between windows
(+-15 %) is larger than that sample could resolve.

So an idle training step (no inference in it) runs with every pinned thread allowed on
all the cores the worker's threads were pinned to; the next step's inference, and every
step with inference, runs pinned as vLLM set it. Switching is a few sched_setaffinity
calls per thread (microseconds). VLLM_SLORA_IDLE_UNPIN=0 keeps the threads pinned throughout.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

ENV_IDLE_UNPIN = "VLLM_SLORA_IDLE_UNPIN"


def idle_unpin_enabled() -> bool:
    return os.environ.get(ENV_IDLE_UNPIN, "1") != "0"


def _tasks() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:  # not Linux
        return []


class PinnedThreads:
    """The process's threads pinned to one core each, as found when first asked (vLLM pins
    its OpenMP threads once, at worker start)."""

    def __init__(self) -> None:
        self.pinned: dict[int, set[int]] = {}
        for tid in _tasks():
            try:
                cpus = os.sched_getaffinity(tid)
            except OSError:  # the thread ended meanwhile
                continue
            if len(cpus) == 1:
                self.pinned[tid] = cpus
        self.cores: set[int] = set().union(*self.pinned.values()) if self.pinned else set()

    @property
    def active(self) -> bool:
        """Threads are pinned to two or more distinct cores: there is something to unpin."""
        return len(self.cores) >= 2

    def _set(self, cpus_of) -> None:
        for tid, cpus in self.pinned.items():
            try:
                os.sched_setaffinity(tid, cpus_of(cpus))
            except OSError:  # the thread ended: nothing to restore either
                pass

    @contextmanager
    def unpinned(self):
        """Every pinned thread may run on any of the pinned cores inside; pinned again after."""
        if not self.active:
            yield
            return
        self._set(lambda _: self.cores)
        try:
            yield
        finally:
            self._set(lambda cpus: cpus)
