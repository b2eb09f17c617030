"""Page-packed adapters kept in host memory, LRU, bounded in bytes (per worker / TP rank).

A hit turns re-admitting an evicted adapter into a host->pool copy with no disk read.
Entries are keyed by ``(lora_path, files)``, where ``files`` is the (inode, size,
mtime) identity of the adapter's files that the scheduler validated and sized
(`AdapterSpec.files`). A hit never touches the disk, so serving does not depend on the
files staying there; a read checks that it found exactly those files (before and after
reading) and fails that adapter, naming the problem, when they changed.

`warm` reads and packs an adapter on a background thread (the scheduler names adapters of
requests near the head of its queue) and says when it is done; the scheduler loads an
adapter into pages only after that, so a step never waits on the disk.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vllm_slora.adapters import AdapterError, AdapterSpec, BaseModelShape, inspect_adapter
from vllm_slora.adapters.validation import adapter_files_identity

from .packing import PackedAdapter, pack_adapter

CacheKey = tuple[str, tuple]  # (lora_path, files identity)
# Called with None when the adapter is in the cache, else with the error message.
WarmDone = Callable[[str | None], None]


@dataclass
class _Entry:
    packed: PackedAdapter
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
        on_drop: Callable[[CacheKey], None] | None = None,
    ) -> None:
        self.base = base
        self.page_elems = page_elems
        self.dtype = dtype
        self.capacity_bytes = capacity_bytes
        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self.max_lora_rank = max_lora_rank
        self.allow_pickle = allow_pickle
        # Told (lock held) about every entry that leaves the cache.
        self.on_drop = on_drop
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()  # oldest first
        self._warming: dict[CacheKey, Future] = {}
        # Guards entries, _warming, the counters and the latency list: the warm thread
        # writes all of them.
        self._lock = threading.Lock()
        self._warmer: ThreadPoolExecutor | None = None  # started on first use
        self._nbytes_total = 0
        self.hits = 0
        self.misses = 0
        self.warmed = 0  # adapters read and packed in the background
        self.read_errors = 0
        self._read_seconds: list[float] = []

    # -- figures ---------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes_total

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "warmed": self.warmed, "bytes": self._nbytes_total,
                    "entries": len(self._entries), "read_errors": self.read_errors}

    def take_read_seconds(self) -> list[float]:
        """Durations of disk reads (read + check + pack) finished since the last call."""
        with self._lock:
            taken, self._read_seconds = self._read_seconds, []
        return taken

    # -- reads -----------------------------------------------------------------------------
    def inspect(self, name: str, path: str, version: int = 1) -> AdapterSpec:
        """Validate an adapter directory for this worker's model and page size.

        Raises AdapterError naming the adapter and the problem.
        """
        spec = inspect_adapter(
            name, path, self.base, max_lora_rank=self.max_lora_rank, page_elems=self.page_elems,
            tp_size=self.tp_size, allow_pickle=self.allow_pickle,
        )
        return dataclasses.replace(spec, version=version)

    def lookup(self, path: str, files: tuple) -> PackedAdapter | None:
        """The cached adapter, or None; never touches the disk."""
        with self._lock:
            entry = self._entries.get((path, files))
            if entry is None:
                return None
            self._entries.move_to_end((path, files))
            self.hits += 1
            return entry.packed

    def get(self, name: str, path: str, version: int, files: tuple | None = None) -> PackedAdapter:
        """The packed adapter, from memory or (validated, read, packed) from disk.

        ``files`` is the identity the caller expects (None: whatever is on disk now).
        Raises AdapterError.
        """
        if files is None:
            files = adapter_files_identity(path)
        key = (path, files)
        with self._lock:
            entry = self._entries.get(key)
            pending = self._warming.get(key) if entry is None else None
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry.packed
            if pending is None:
                self.misses += 1
        if pending is not None:
            return pending.result()  # raises the adapter's AdapterError if it is bad
        return self._load(name, path, version, files)

    def warm(self, name: str, path: str, version: int, files: tuple, done: WarmDone | None = None) -> None:
        """Read and pack the adapter on a background thread, unless cached or on its way.

        ``done`` is called once, with None when the adapter is in the cache or with the
        error message (from the warm thread, or at once when it is already cached).
        """
        key = (path, files)
        with self._lock:
            cached = key in self._entries
            future = self._warming.get(key)
            if not cached and future is None:
                if self._warmer is None:
                    self._warmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slora-warm")
                future = self._warmer.submit(self._load, name, path, version, files)
                self._warming[key] = future
                future.add_done_callback(lambda f: self._warm_finished(key, f))
        if cached:
            if done is not None:
                done(None)
            return
        if done is not None:
            future.add_done_callback(lambda f: done(_error_text(f)))

    def _warm_finished(self, key: CacheKey, future: Future) -> None:
        error = _error_text(future)
        with self._lock:
            self._warming.pop(key, None)
            if error is None:
                self.warmed += 1
        if error is not None:
            from vllm_slora.compat import logger

            logger.warning("vllm-slora: background read failed on TP rank %d: %s", self.tp_rank, error)

    def _load(self, name: str, path: str, version: int, files: tuple) -> PackedAdapter:
        started = time.perf_counter()
        try:
            spec = self.inspect(name, path, version)
            if spec.files != files:
                raise AdapterError(name, _changed(path, "since it was loaded"))
            packed = pack_adapter(spec, self.page_elems, self.dtype, self.tp_size, self.tp_rank)
            if adapter_files_identity(path) != files:
                raise AdapterError(name, _changed(path, "while it was being read"))
        except AdapterError as exc:
            with self._lock:
                self.read_errors += 1
            raise AdapterError(exc.adapter_name, f"{exc.problem} (TP rank {self.tp_rank})") from None
        with self._lock:
            old = self._entries.get((path, files))
            self._insert((path, files), _Entry(packed, pinned=bool(old and old.pinned)))
            self._read_seconds.append(time.perf_counter() - started)
        return packed

    # -- entries ---------------------------------------------------------------------------
    def _insert(self, key: CacheKey, entry: _Entry) -> None:
        """Add an entry, then evict least recently used ones past the budget (lock held)."""
        # Other files at the same path are older versions: dead weight.
        for old in [k for k in self._entries if k[0] == key[0] and k != key]:
            self._remove(old)
        self._remove(key)
        self._entries[key] = entry
        self._nbytes_total += entry.packed.nbytes
        for victim in list(self._entries):
            if self._nbytes_total <= self.capacity_bytes:
                break
            if victim == key or self._entries[victim].pinned:
                continue
            self._remove(victim)
        if self._nbytes_total > self.capacity_bytes and not entry.pinned:
            # Larger than the whole budget on its own: serve it this once, keep nothing.
            # Not reported as dropped: the scheduler still treats it as read, and its
            # loads read the disk on the step (a host cache too small for one adapter).
            del self._entries[key]
            self._nbytes_total -= entry.packed.nbytes

    def _remove(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._nbytes_total -= entry.packed.nbytes
        if self.on_drop is not None:
            self.on_drop(key)

    def drop_path(self, path: str) -> bool:
        """Forget every version of the adapter at ``path``; True if any was cached."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == path]
            for k in keys:
                self._remove(k)
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

    def close(self) -> None:
        """Stop the warm thread (reads not started yet are cancelled)."""
        with self._lock:
            warmer, self._warmer = self._warmer, None
        if warmer is not None:
            warmer.shutdown(wait=False, cancel_futures=True)

    def __contains__(self, key: CacheKey) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _error_text(future: Future) -> str | None:
    if future.cancelled():
        return "the background read was cancelled"
    exc = future.exception()
    return None if exc is None else str(exc)


def _changed(path: str, when: str) -> str:
    return (f"the adapter files at {path} changed on disk {when}; load it again "
            "(/v1/load_lora_adapter with load_inplace) to serve the new files")
