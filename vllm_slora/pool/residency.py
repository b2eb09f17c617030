"""Adapter residency in the KV block pool (EngineCore process).

An adapter's weights occupy ordinary KV blocks of vLLM's `BlockPool`, so adapters and
the KV cache compete for one pool with no fixed split. An adapter is in one of:

* absent   - no blocks; its weights are only on disk / in a worker's host cache;
* pinned   - blocks held (ref_cnt 1) because a running request uses it;
* cached   - blocks released with `BlockPool.unpin_blocks`: they count as free and sit
             at the *tail* of the free queue, so KV allocation reclaims them only after
             every truly free block is gone. While untouched, the weights stay valid and
             re-pinning is free (a warm cache instead of S-LoRA's evict-when-idle).

When the pool hands out any block of a cached adapter, the `on_reuse` watcher marks the
whole adapter absent (its pages are about to be overwritten) and reports it evicted.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import Enum

from vllm_slora.step_plan import AdapterPlacement


class Residency(Enum):
    ABSENT = "absent"
    PINNED = "pinned"
    CACHED = "cached"


@dataclass
class _Entry:
    placement: AdapterPlacement
    blocks: list  # KVCacheBlock objects, in page order
    state: Residency = Residency.PINNED


@dataclass
class PoolStats:
    total_blocks: int
    free_blocks: int  # includes the blocks of cached adapters
    pinned_adapters: int
    cached_adapters: int
    pinned_adapter_blocks: int
    cached_adapter_blocks: int
    loads: int
    evictions: int

    @property
    def kv_blocks(self) -> int:
        """Blocks held by the KV cache (the null block excluded)."""
        return self.total_blocks - 1 - self.free_blocks - self.pinned_adapter_blocks


@dataclass
class AdapterResidency:
    """Pins, caches and reclaims adapter blocks in a vLLM BlockPool."""

    block_pool: object  # vllm.v1.core.block_pool.BlockPool
    # Called with the lora_int_id of an adapter whose cached blocks were reclaimed.
    on_evict: Callable[[int], None] | None = None
    _entries: dict[int, _Entry] = field(default_factory=dict)
    _loads: int = 0
    _evictions: int = 0
    # Running totals over _entries by state (stats() runs every engine step), kept by
    # _add / _set_state / _remove, the only places entries or their states change.
    _pinned_adapters: int = 0
    _cached_adapters: int = 0
    _pinned_blocks: int = 0
    _cached_blocks: int = 0

    # -- queries ---------------------------------------------------------------------
    def state(self, lora_int_id: int) -> Residency:
        entry = self._entries.get(lora_int_id)
        return entry.state if entry else Residency.ABSENT

    def placement(self, lora_int_id: int) -> AdapterPlacement | None:
        entry = self._entries.get(lora_int_id)
        return entry.placement if entry else None

    def stats(self) -> PoolStats:
        return PoolStats(
            total_blocks=self.block_pool.num_gpu_blocks,
            free_blocks=self.block_pool.get_num_free_blocks(),
            pinned_adapters=self._pinned_adapters,
            cached_adapters=self._cached_adapters,
            pinned_adapter_blocks=self._pinned_blocks,
            cached_adapter_blocks=self._cached_blocks,
            loads=self._loads,
            evictions=self._evictions,
        )

    # -- transitions -----------------------------------------------------------------
    def pin(
        self, lora_int_id: int, num_blocks: int, describe: Callable[[tuple[int, ...]], AdapterPlacement]
    ) -> tuple[AdapterPlacement, bool] | None:
        """Make the adapter resident and pinned.

        Returns (placement, needs_load) or None when the pool cannot spare `num_blocks`
        right now (the caller defers the request). `describe(block_ids)` builds the
        placement for a fresh allocation. needs_load is True when the pages are new.
        """
        entry = self._entries.get(lora_int_id)
        if entry is not None and entry.state is Residency.PINNED:
            return entry.placement, False
        if entry is not None and entry.state is Residency.CACHED:
            self.block_pool.touch(entry.blocks)
            self._drop_watchers(entry.blocks)
            self._set_state(entry, Residency.PINNED)
            return entry.placement, False
        if num_blocks > self.block_pool.get_num_free_blocks():
            return None
        blocks = self.block_pool.get_new_blocks(num_blocks)
        placement = describe(tuple(b.block_id for b in blocks))
        self._add(lora_int_id, _Entry(placement, blocks))
        self._loads += 1
        return placement, True

    def unpin(self, lora_int_id: int) -> None:
        """Keep the adapter's weights but let the KV cache reclaim its blocks."""
        entry = self._entries.get(lora_int_id)
        if entry is None or entry.state is not Residency.PINNED:
            return
        self._set_state(entry, Residency.CACHED)
        watcher = self._make_watcher(lora_int_id, entry)
        self.block_pool.unpin_blocks(entry.blocks, watcher)

    def retain_only(self, keep: set[int]) -> None:
        """Unpin every pinned adapter not in `keep`."""
        for lora_int_id in list(self._entries):
            if lora_int_id not in keep:
                self.unpin(lora_int_id)

    def forget(self, lora_int_id: int) -> None:
        """Drop an adapter entirely (e.g. re-registered under a new version)."""
        entry = self._entries.get(lora_int_id)
        if entry is None:
            return
        if entry.state is Residency.PINNED:
            self.unpin(lora_int_id)
        # Cached blocks stay in the free queue; without a watcher they are plain free.
        self._drop_watchers(entry.blocks)
        self._remove(lora_int_id)

    def drop_all_cached(self) -> None:
        """Forget every cached adapter (before vLLM resets the prefix cache)."""
        for lora_int_id, entry in list(self._entries.items()):
            if entry.state is Residency.CACHED:
                self.forget(lora_int_id)
                if self.on_evict:
                    self.on_evict(lora_int_id)

    # -- internals -------------------------------------------------------------------
    def _count(self, entry: _Entry, sign: int) -> None:
        """Add (sign 1) or take back (sign -1) the entry in the totals of its state."""
        if entry.state is Residency.PINNED:
            self._pinned_adapters += sign
            self._pinned_blocks += sign * len(entry.blocks)
        elif entry.state is Residency.CACHED:
            self._cached_adapters += sign
            self._cached_blocks += sign * len(entry.blocks)

    def _add(self, lora_int_id: int, entry: _Entry) -> None:
        old = self._entries.get(lora_int_id)
        if old is not None:
            self._count(old, -1)
        self._entries[lora_int_id] = entry
        self._count(entry, 1)

    def _set_state(self, entry: _Entry, state: Residency) -> None:
        self._count(entry, -1)
        entry.state = state
        self._count(entry, 1)

    def _remove(self, lora_int_id: int) -> None:
        self._count(self._entries.pop(lora_int_id), -1)

    def _make_watcher(self, lora_int_id: int, entry: _Entry):
        def on_reuse(_block) -> None:
            # A block of this cached adapter is being handed out: the adapter's pages
            # are no longer intact. Only the first reclaimed block acts; the entry
            # identity check ignores watchers left from an older residency.
            if self._entries.get(lora_int_id) is not entry or entry.state is not Residency.CACHED:
                return
            self._drop_watchers(entry.blocks)
            self._remove(lora_int_id)
            self._evictions += 1
            if self.on_evict:
                self.on_evict(lora_int_id)

        return on_reuse

    def _drop_watchers(self, blocks) -> None:
        # `touch` leaves unpin watchers registered (they would fire on a later reuse of
        # a block we own again), so remove them explicitly. vLLM 0.32 private field.
        watchers: dict[Hashable, object] = self.block_pool._reuse_watchers
        for block in blocks:
            watchers.pop(block.block_id, None)
