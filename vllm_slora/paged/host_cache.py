"""Page-packed adapters kept in host memory, LRU, bounded in bytes (per worker / TP rank).

A hit turns re-admitting an evicted adapter into a host->pool copy with no disk read.
Keys are ``(lora_path, version, tp_rank)`` as the scheduler's plan names them; the weight
file's (inode, size, mtime) is checked on every hit as well, so a file replaced in place
is never served from a stale entry even when the version was not bumped.

`warm` reads and packs an adapter on a background thread (the scheduler names adapters of
requests near the head of its queue), so the step that later puts it into pages finds it
here instead of waiting on the disk; a `get` for an adapter still being warmed waits for
that one read instead of starting another.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vllm_slora.adapters import AdapterSpec, BaseModelShape, inspect_adapter

from .packing import PackedAdapter, pack_adapter

CacheKey = tuple[str, int, int]  # (lora_path, version, tp_rank)


def _file_identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class _Entry:
    packed: PackedAdapter
    file_identity: tuple[int, int, int] | None
    pinned: bool = False


class HostAdapterCache:
    def __init__(
        self,
        base: BaseModelShape,
        page_elems: int,
        dtype: torch.dtype,
        capacity_bytes: int,
        *,
        tp_size: int = 1,
        tp_rank: int = 0,
        max_lora_rank: int | None = None,
        allow_pickle: bool = False,
    ) -> None:
        self.base = base
        self.page_elems = page_elems
        self.dtype = dtype
        self.capacity_bytes = capacity_bytes
        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self.max_lora_rank = max_lora_rank
        self.allow_pickle = allow_pickle
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()  # oldest first
        self._warming: dict[CacheKey, Future] = {}
        self._lock = threading.Lock()  # entries and _warming: the warm thread inserts too
        self._warmer: ThreadPoolExecutor | None = None  # started on first use
        self.hits = 0
        self.misses = 0
        self.warmed = 0  # adapters read and packed in the background

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes()

    def _nbytes(self) -> int:
        return sum(e.packed.nbytes for e in self._entries.values())

    def inspect(self, name: str, path: str, version: int = 1) -> AdapterSpec:
        """Validate an adapter directory for this worker's model and page size.

        Raises AdapterError naming the adapter and the problem.
        """
        spec = inspect_adapter(
            name, path, self.base, max_lora_rank=self.max_lora_rank, page_elems=self.page_elems,
            tp_size=self.tp_size, allow_pickle=self.allow_pickle,
        )
        return dataclasses.replace(spec, version=version)

    def get(self, name: str, path: str, version: int) -> PackedAdapter:
        """The packed adapter, from memory or (validated, read, packed) from disk."""
        key = (path, version, self.tp_rank)
        with self._lock:
            packed = self._lookup(key)
            pending = self._warming.get(key) if packed is None else None
        if packed is not None:
            self.hits += 1
            return packed
        if pending is not None:
            self.hits += 1  # the disk read already happened (or is happening) off the step
            return pending.result()  # raises the adapter's AdapterError if it is bad
        self.misses += 1
        return self._load(name, path, version)

    def warm(self, name: str, path: str, version: int) -> None:
        """Read and pack the adapter on a background thread, unless cached or on its way."""
        key = (path, version, self.tp_rank)
        with self._lock:
            if key in self._warming or self._lookup(key, touch=False) is not None:
                return
            if self._warmer is None:
                self._warmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slora-warm")
            future = self._warmer.submit(self._load, name, path, version)
            self._warming[key] = future

        def done(_future: Future) -> None:
            with self._lock:
                self._warming.pop(key, None)
            if _future.exception() is None:
                self.warmed += 1

        future.add_done_callback(done)

    def _lookup(self, key: CacheKey, touch: bool = True) -> PackedAdapter | None:
        """A cached entry whose weight file is unchanged (lock held)."""
        entry = self._entries.get(key)
        if entry is None or entry.file_identity != _file_identity(entry.packed.spec.checkpoint.path):
            return None
        if touch:
            self._entries.move_to_end(key)
        return entry.packed

    def _load(self, name: str, path: str, version: int) -> PackedAdapter:
        spec = self.inspect(name, path, version)
        packed = pack_adapter(spec, self.page_elems, self.dtype, self.tp_size, self.tp_rank)
        key = (path, version, self.tp_rank)
        with self._lock:
            old = self._entries.get(key)
            self._insert(key, _Entry(packed, _file_identity(spec.checkpoint.path), pinned=bool(old and old.pinned)))
        return packed

    def _insert(self, key: CacheKey, entry: _Entry) -> None:
        """Add an entry, then evict least recently used ones past the budget (lock held)."""
        # A new version makes every older one of the same path dead weight.
        for old in [k for k in self._entries if k[0] == key[0] and k[1] < key[1]]:
            del self._entries[old]
        self._entries[key] = entry
        self._entries.move_to_end(key)
        total = self._nbytes()
        for victim in list(self._entries):
            if total <= self.capacity_bytes:
                break
            if victim == key or self._entries[victim].pinned:
                continue
            total -= self._entries.pop(victim).packed.nbytes
        if total > self.capacity_bytes and not entry.pinned:
            # Larger than the whole budget on its own: serve it this once, keep nothing.
            self._entries.pop(key, None)

    def drop_path(self, path: str) -> bool:
        """Forget every version of the adapter at ``path``; True if any was cached."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == path]
            for k in keys:
                del self._entries[k]
        return bool(keys)

    def pin_path(self, path: str) -> bool:
        """Exempt the cached versions of ``path`` from LRU eviction."""
        found = False
        with self._lock:
            for k, e in self._entries.items():
                if k[0] == path:
                    e.pinned = found = True
        return found

    def wait_warm(self) -> None:
        """Block until every background read has finished (tests, shutdown)."""
        with self._lock:
            pending = list(self._warming.values())
        for future in pending:
            future.exception()

    def __contains__(self, key: CacheKey) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
