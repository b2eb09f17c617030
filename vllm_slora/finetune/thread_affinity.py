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
step with inference, runs pinned as vLLM set it. Switching is one sched_setaffinity call
per thread each way, after listing them (well under a millisecond).
VLLM_SLORA_IDLE_UNPIN=0 keeps the threads pinned throughout.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

ENV_IDLE_UNPIN = "VLLM_SLORA_IDLE_UNPIN"


def idle_unpin_enabled() -> bool:
    return os.environ.get(ENV_IDLE_UNPIN, "1") != "0"


def _affinities() -> dict[int, set[int]]:
    """Every thread of this process now, with the cores it may run on."""
    try:
        tids = [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:  # not Linux
        return {}
    out = {}
    for tid in tids:
        try:
            out[tid] = os.sched_getaffinity(tid)
        except OSError:  # the thread ended meanwhile
            pass
    return out


def _set_affinities(cpus_of: dict[int, set[int]]) -> None:
    for tid, cpus in cpus_of.items():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended (its id came from /proc/self/task moments ago), or a
            pass  # core left this process's cpuset: that thread stays as it is, the step goes on


class PinnedThreads:
    """The cores vLLM pinned this process's threads to, one core each (found when first made:
    vLLM pins its OpenMP threads once, at worker start; threads started later inherit their
    creator's core). The threads themselves are listed again at every switch: the worker
    starts threads later (e.g. the host cache's reader on its first disk read)."""

    def __init__(self) -> None:
        pinned = [cpus for cpus in _affinities().values() if len(cpus) == 1]
        self.cores: set[int] = set().union(*pinned) if pinned else set()
        # What a thread started by the caller (the worker's main thread) gets from vLLM's pinning.
        self.home: set[int] = os.sched_getaffinity(0)

    @property
    def active(self) -> bool:
        """Threads are pinned to two or more distinct cores: there is something to unpin."""
        return len(self.cores) >= 2

    @contextmanager
    def unpinned(self):
        """Every thread pinned to one of the cores may run on all of them inside; pinned again
        after, and a thread started inside (it inherited all the cores) gets the caller's core,
        as it would have outside. Threads never pinned are left alone."""
        if not self.active:
            yield
            return
        before = _affinities()
        pinned = {tid: cpus for tid, cpus in before.items() if len(cpus) == 1 and cpus <= self.cores}
        _set_affinities({tid: self.cores for tid in pinned})
        try:
            yield
        finally:
            started = {tid: self.home for tid, cpus in _affinities().items()
                       if tid not in before and cpus == self.cores}
            _set_affinities({**pinned, **started})
