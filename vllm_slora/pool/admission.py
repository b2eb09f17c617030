"""Admission of waiting requests under pool pressure (pure policy, no vLLM imports).

A request with an adapter needs, at once, its adapter's blocks and the KV blocks of its
tokens, all from the one pool (pool/residency.py). Three rules, applied by the scheduler
(`SLoRASchedulerMixin._handle_blocked_waiting_request`) and, for the first, already where
the request enters (frontend_validation.py):

1. Never fits: adapter blocks + KV blocks > usable pool blocks. The request is refused
   with both counts and the pool size (`never_fits`); it would otherwise wait forever
   and hold its queue position.
2. Fits later: its adapter is made resident (pinned, maybe loaded) only when the adapter
   *and* the request's KV blocks fit in the free blocks now (`Demand.fits`). Otherwise
   it waits without touching the pool, and requests behind it go ahead. (Pinning an
   adapter whose request then cannot get KV blocks would unpin it after the step, let
   the KV cache reclaim it and load it again the next step: the load/evict loop.)
   Requests without an adapter, or whose adapter running requests already pin, are left
   to vLLM's own KV allocation (chunked prefill included), as before.
3. Bounded wait: a request refused admission for `MAX_BLOCKED_STEPS` scheduler steps
   gets a reservation (`AdmissionGate`): while it waits, any other waiting request is
   admitted only if both fit in the free blocks together, so running requests drain
   and it gets in. Running requests are never preempted for it. One reservation at a
   time, oldest first; it ends when its request leaves the waiting queue.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

# Scheduler steps a request may be refused admission (each step considers a waiting
# request at most once) before it gets a reservation. Small enough that a large-rank
# adapter behind a stream of small ones waits about this many steps plus the time the
# running requests take to finish; large enough that ordinary short waits for room
# (a few steps) never throttle the batch. The scheduler reads
# `slora_config.max_blocked_steps` instead if the config ever gets that key.
MAX_BLOCKED_STEPS = 32


def kv_blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks a request of `num_tokens` needs to produce its next token."""
    return -(-(num_tokens + 1) // block_size)


def never_fits(adapter_blocks: int, num_tokens: int, block_size: int, usable_blocks: int) -> str | None:
    """Why a request with this adapter can never run in this pool, or None if it can.

    The text follows the adapter's name (`AdapterError(name, problem)`).
    """
    kv_blocks = kv_blocks_for(num_tokens, block_size)
    if adapter_blocks + kv_blocks <= usable_blocks:
        return None
    return (
        f"needs {adapter_blocks} pool blocks and this request's {num_tokens} tokens need "
        f"{kv_blocks} KV blocks ({block_size} tokens each) beside it: {adapter_blocks + kv_blocks} "
        f"blocks, but the whole pool has {usable_blocks}, so the request can never run; "
        "send a shorter prompt or use an adapter of smaller rank"
    )


@dataclass(frozen=True)
class Demand:
    """Free blocks a waiting request takes when admitted."""

    adapter: Hashable | None  # the adapter's identity (lora_int_id), None without one
    adapter_blocks: int  # 0 when already pinned by a running request
    kv_blocks: int

    @property
    def total(self) -> int:
        return self.adapter_blocks + self.kv_blocks

    def fits(self, free_blocks: int, beside: Demand | None = None) -> bool:
        """Whether this request fits in `free_blocks`, leaving room for `beside` too."""
        need = self.total
        if beside is not None:
            need += beside.kv_blocks
            if beside.adapter is None or beside.adapter != self.adapter:
                need += beside.adapter_blocks
        return need <= free_blocks


@dataclass
class _Waiter:
    handle: object  # the scheduler's request object, passed back to `is_waiting`
    order: tuple  # (arrival_time, request_id): older first
    blocked_steps: int = 0


@dataclass
class AdmissionGate:
    """Counts how long waiting requests are refused admission; holds one reservation."""

    max_blocked_steps: int = MAX_BLOCKED_STEPS
    _waiters: dict[str, _Waiter] = field(default_factory=dict)
    _aged: dict[str, _Waiter] = field(default_factory=dict)  # refused >= max_blocked_steps
    _reserved: tuple[str, _Waiter] | None = None
    _prune_at: int = 256

    def blocked_steps(self, request_id: str) -> int:
        waiter = self._waiters.get(request_id)
        return waiter.blocked_steps if waiter else 0

    def blocked(self, request_id: str, order: tuple, handle: object = None) -> None:
        """The request was considered this step and not admitted."""
        waiter = self._waiters.get(request_id)
        if waiter is None:
            waiter = self._waiters[request_id] = _Waiter(handle, order)
        waiter.blocked_steps += 1
        if waiter.blocked_steps >= self.max_blocked_steps:
            self._aged[request_id] = waiter

    def admitted(self, request_id: str) -> None:
        """The request passed admission: it stops ageing. A reservation it holds stays
        until `holder` sees it leave the waiting queue (vLLM may still fail to fit it)."""
        self._waiters.pop(request_id, None)
        self._aged.pop(request_id, None)

    def forget(self, request_id: str) -> None:
        """The request is gone (refused, finished): drop its age and any reservation."""
        self.admitted(request_id)
        if self._reserved is not None and self._reserved[0] == request_id:
            self._reserved = None

    def holder(self, is_waiting: Callable[[object], bool]) -> tuple[str, object] | None:
        """(request id, handle) of the request holding the reservation, or None.

        `is_waiting(handle)` says whether a request still waits for admission. A holder
        that left gives way to the oldest waiting request refused `max_blocked_steps`.
        """
        if self._reserved is not None:
            request_id, waiter = self._reserved
            if is_waiting(waiter.handle):
                return request_id, waiter.handle
            self.forget(request_id)
        if len(self._waiters) >= self._prune_at:
            self._prune(is_waiting)
        for request_id, waiter in sorted(self._aged.items(), key=lambda item: item[1].order):
            if is_waiting(waiter.handle):
                self._reserved = (request_id, waiter)
                return request_id, waiter.handle
            self.forget(request_id)
        return None

    def _prune(self, is_waiting: Callable[[object], bool]) -> None:
        for request_id, waiter in list(self._waiters.items()):
            if not is_waiting(waiter.handle):
                self.forget(request_id)
        self._prune_at = max(256, 2 * len(self._waiters))
