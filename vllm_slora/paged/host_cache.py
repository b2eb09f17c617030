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
        # Reads in flight: the future and who waits to be told (`done` callbacks).
        self._warming: dict[CacheKey, tuple[Future, list[WarmDone]]] = {}
        # Guards entries, _warming, the counters and the latency list: the warm thread
        # writes all of them. `_idle` wakes wait_warm once no read is in flight.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
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
            pending = self._warming.get(key, (None,))[0] if entry is None else None
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
            if not cached:
                if key in self._warming:
                    if done is not None:
                        self._warming[key][1].append(done)
                    return
                if self._warmer is None:
                    self._warmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slora-warm")
                future = self._warmer.submit(self._warm_job, key, name, path, version, files)
                self._warming[key] = (future, [done] if done is not None else [])
        if cached and done is not None:
            done(None)

    def _warm_job(self, key: CacheKey, name: str, path: str, version: int, files: tuple) -> PackedAdapter | None:
        error, failure, packed = None, None, None
        try:
            packed = self._load(name, path, version, files)
        except Exception as exc:  # AdapterError; anything else is reported the same way
            error, failure = str(exc), exc
            from vllm_slora.compat import logger

            logger.warning("vllm-slora: background read failed on TP rank %d: %s", self.tp_rank, error)
        with self._lock:
            if error is None:
                self.warmed += 1
        self._tell(key, error)
        if failure is not None:
            raise failure  # for a `get` waiting on this read
        return packed

    def _tell(self, key: CacheKey, error: str | None) -> None:
        """Call every `done` of a read, including ones added meanwhile, then retire it."""
        while True:
            with self._lock:
                _, dones = self._warming[key]
                if not dones:
                    del self._warming[key]
                    self._idle.notify_all()
                    return
                self._warming[key] = (self._warming[key][0], [])
            for done in dones:
                done(error)

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

    def put_trained(self, name: str, path: str, tensors: dict[str, torch.Tensor]) -> tuple:
        """Cache a just-trained adapter from memory; returns its files identity.

        The trainer has just written its PEFT files to ``path`` (durable checkpoint, and
        what the server registers); the weights come from ``tensors`` (PEFT keys), so the
        later pool load of this version never reads the disk. The entry is keyed by the
        identity of the files now on disk, exactly what the scheduler will validate.
        """
        spec = self.inspect(name, path)  # adapter_config.json + the safetensors header only
        packed = pack_adapter(spec, self.page_elems, self.dtype, self.tp_size, self.tp_rank, tensors=tensors)
        with self._lock:
            self._insert((path, spec.files), _Entry(packed))
        return spec.files

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
        """Block until every background read has finished and said so (tests, shutdown)."""
        with self._idle:
            self._idle.wait_for(lambda: not self._warming)

    def close(self) -> None:
        """Stop the warm thread; reads not started yet are cancelled and say so."""
        with self._lock:
            warmer, self._warmer = self._warmer, None
        if warmer is None:
            return
        warmer.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            cancelled = [key for key, (future, _) in self._warming.items() if future.cancelled()]
        for key in cancelled:
            self._tell(key, "the background read was cancelled")

    def __contains__(self, key: CacheKey) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _changed(path: str, when: str) -> str:
    return (f"the adapter files at {path} changed on disk {when}; load it again "
            "(/v1/load_lora_adapter with load_inplace) to serve the new files")
