"""The worker's adapter state: host cache, resident adapters' rows, the step's tables.

The scheduler decides residency; this class only executes its plans (fill pages of
`load`, forget `evicted`) and turns each step's token->lora_int_id map into the
token->adapter-row map and stacked tables the paged layers read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from vllm_slora.adapters import AdapterError, BaseModelShape
from vllm_slora.adapters.modules import COLUMN_PARALLEL
from vllm_slora.step_plan import AdapterPlacement, SLoRAStepPlan, SLoRAWorkerReport

from .adapter_tables import ResidentAdapter, resident_adapter
from .backends import pick_backend
from .host_cache import HostAdapterCache
from .modules import PAGED_MODULES
from .page_writer import write_pages
from .step_metadata import StepMetadata

# Rows per table entry when the engine gives no max_lora_rank (tests, tools).
DEFAULT_MAX_ROWS = 64


class PagedAdapterManager:
    def __init__(
        self,
        base: BaseModelShape,
        dtype: torch.dtype,
        device: torch.device | str,
        host_cache_bytes: int,
        *,
        tp_size: int = 1,
        tp_rank: int = 0,
        max_lora_rank: int | None = None,
        allow_pickle: bool = False,
        max_num_tokens: int = 0,
        max_adapters_per_step: int = 1,
        kernel_backend: str = "auto",
        gather_objects=None,
    ) -> None:
        self.base = base
        self.dtype = dtype
        self.device = torch.device(device)
        self.host_cache_bytes = host_cache_bytes
        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self.max_lora_rank = max_lora_rank
        self.allow_pickle = allow_pickle
        self.backend = pick_backend(kernel_backend, self.device)
        # Rows an adapter can have in one table entry: its padded rank (B^T rows of a
        # column-parallel TP shard are the whole padded rank).
        max_rank = max_lora_rank or DEFAULT_MAX_ROWS
        max_rows = -(-max_rank // tp_size) * tp_size
        chunked = tuple(name for name, slices in PAGED_MODULES.items()
                        if tp_size > 1 and slices[0] in COLUMN_PARALLEL)
        self.state = StepMetadata(
            base.num_layers, max(1, max_num_tokens), max(1, max_adapters_per_step), max_rows, self.device,
            chunked_modules=chunked, tp_size=tp_size, segment_meta=self.backend.name == "triton",
        )
        self.page_elems: int | None = None
        self.host_cache: HostAdapterCache | None = None
        self.resident: dict[int, ResidentAdapter] = {}
        # lora_int_id -> (name, path, latest version seen), from plans and add_lora.
        self.known: dict[int, tuple[str, str, int]] = {}
        # Every TP rank's object in rank order (TPGroup.all_gather_object): how the ranks
        # agree on load failures. Unused at TP 1.
        self.gather_objects = gather_objects or (lambda obj: [obj])
        # Adapters whose pages could not be filled (on any rank), with the reason: their
        # tokens run without LoRA until the scheduler, told by the report, fails their
        # requests and evicts them.
        self.failed: dict[int, str] = {}
        # What the next report tells the scheduler; warm threads append too.
        self._events_lock = threading.Lock()
        self._ready: list[tuple[int, int]] = []
        self._failures: list[tuple[int, int, str]] = []
        self._dropped: list[tuple[int, int]] = []
        self._copy_seconds: list[float] = []
        # Host-cache key -> the (lora_int_id, version)s warmed under it (for `dropped`).
        self._key_owners: dict[tuple, set[tuple[int, int]]] = {}
        # The same pairs indexed by lora_int_id: lora_int_id -> {(key, (lora_int_id, version))},
        # so an unload touches only its adapter's entries. Kept in step with _key_owners.
        self._owned_keys: dict[int, set[tuple[tuple, tuple[int, int]]]] = {}

    # -- pool --------------------------------------------------------------------------
    def attach_pool(self, pools: Sequence[torch.Tensor], page_elems: int) -> None:
        """Use the (new) KV cache as the pool; pages of any earlier pool are gone."""
        if len(pools) != self.base.num_layers:
            raise NotImplementedError(
                f"vllm-slora: {len(pools)} KV cache layers for a model of {self.base.num_layers} layers"
            )
        self.state.pools = list(pools)
        if page_elems != self.page_elems:
            self.page_elems = page_elems
            if self.host_cache is not None:
                self.host_cache.close()
            self.host_cache = HostAdapterCache(
                self.base, page_elems, self.dtype, self.host_cache_bytes, tp_size=self.tp_size,
                tp_rank=self.tp_rank, max_lora_rank=self.max_lora_rank, allow_pickle=self.allow_pickle,
                on_drop=self._on_host_drop,
            )
        self.resident.clear()
        self.state.release_all()

    # -- the scheduler's plan ----------------------------------------------------------
    def apply_plan(self, plan: SLoRAStepPlan) -> None:
        """Start background reads of `warm` adapters, forget evicted ones, fill new pages.

        An adapter whose pages cannot be filled (files changed, unreadable, bad values)
        fails alone: it is reported, its tokens run without LoRA this step and the
        scheduler fails its requests. Every TP rank agrees on the failures first.
        """
        if self.host_cache is None:
            if plan.load:
                raise RuntimeError("vllm-slora: an adapter plan arrived before the KV cache exists")
            return
        for source in plan.warm:
            key = (source.lora_path, source.files)
            owner = (source.lora_int_id, source.version)
            with self._events_lock:
                self._key_owners.setdefault(key, set()).add(owner)
                self._owned_keys.setdefault(owner[0], set()).add((key, owner))
            self.host_cache.warm(source.lora_name, source.lora_path, source.version, source.files,
                                 done=partial(self._warm_done, owner))
        for lora_int_id in plan.evicted:
            self.resident.pop(lora_int_id, None)
            self.failed.pop(lora_int_id, None)
            self.state.release(lora_int_id)
        failures: dict[int, tuple[int, str]] = {}  # lora_int_id -> (version, why)
        for placement in plan.load:
            self.failed.pop(placement.lora_int_id, None)
            try:
                self._fill_pages(placement)
            except AdapterError as exc:
                failures[placement.lora_int_id] = (placement.version, str(exc))
        if plan.load and self.tp_size > 1:
            failures = self._agree_on_failures(failures)
        for lora_int_id, (version, message) in failures.items():
            self.resident.pop(lora_int_id, None)
            self.state.release(lora_int_id)
            self.failed[lora_int_id] = message
            with self._events_lock:
                self._failures.append((lora_int_id, version, message))

    def _fill_pages(self, placement: AdapterPlacement) -> None:
        files = placement.files or None  # () from callers that do not know the files
        packed = None
        if files is not None:
            packed = self.host_cache.lookup(placement.lora_path, files)
        if packed is None:  # the scheduler thought it ready, but it left the cache since
            packed = self.host_cache.get(placement.lora_name, placement.lora_path, placement.version, files)
        if packed.num_pages > len(placement.block_ids):
            raise AdapterError(placement.lora_name, f"needs {packed.num_pages} blocks but the scheduler sized it "
                                                    f"for {len(placement.block_ids)} (TP rank {self.tp_rank})")
        started = time.perf_counter()
        write_pages(packed, self.state.pools, placement.block_ids)
        elapsed = time.perf_counter() - started
        self.resident[placement.lora_int_id] = resident_adapter(
            placement.lora_int_id, packed, placement.block_ids, self.device, rows_width=self.state.max_rows
        )
        self.known[placement.lora_int_id] = (placement.lora_name, placement.lora_path, placement.version)
        with self._events_lock:
            self._copy_seconds.append(elapsed)

    def _agree_on_failures(self, failures: dict) -> dict:
        """The union of every TP rank's load failures (one small collective, load steps only)."""
        gathered = self.gather_objects(failures)
        merged = {}
        for rank_failures in gathered:
            for lora_int_id, failure in (rank_failures or {}).items():
                merged.setdefault(lora_int_id, failure)
        return merged

    # -- the report back to the scheduler -----------------------------------------------------
    def _warm_done(self, owner: tuple[int, int], error: str | None) -> None:
        with self._events_lock:
            if error is None:
                self._ready.append(owner)
            else:
                self._failures.append((*owner, error))

    def _on_host_drop(self, key: tuple) -> None:
        # Called with the host cache's lock held, maybe from the warm thread.
        with self._events_lock:
            owners = self._key_owners.pop(key, ())
            self._dropped.extend(owners)
            for owner in owners:
                owned = self._owned_keys.get(owner[0])
                if owned is not None:
                    owned.discard((key, owner))
                    if not owned:
                        del self._owned_keys[owner[0]]

    def take_report(self) -> SLoRAWorkerReport:
        """What happened since the previous report (ready / failed / dropped adapters, timings)."""
        with self._events_lock:
            report = SLoRAWorkerReport(
                ready=self._ready, failed=self._failures, dropped=self._dropped,
                pool_copy_seconds=self._copy_seconds,
            )
            self._ready, self._failures, self._dropped, self._copy_seconds = [], [], [], []
        if self.host_cache is not None:
            report.host_cache = self.host_cache.stats()
            report.disk_read_seconds = self.host_cache.take_read_seconds()
        return report

    # -- per step ----------------------------------------------------------------------
    def set_token_mapping(self, token_lora_mapping: Sequence[int] | np.ndarray) -> None:
        """Map each token's lora_int_id (0 = none) to its adapter slot (-1 = none)."""
        ids = np.asarray(token_lora_mapping, dtype=np.int64)  # [T]
        if self.failed:  # their requests are being failed: no LoRA, no missing pages
            ids = np.where(np.isin(ids, list(self.failed)), 0, ids)
        used = np.unique(ids[ids > 0])
        missing = [i for i in used.tolist() if i not in self.resident]
        if missing:
            raise RuntimeError(
                f"vllm-slora: adapters {missing} are used in this step but their pages were never "
                "filled (no load in the scheduler's plan, or evicted since)"
            )
        slots = np.full(ids.size, -1, dtype=np.int32)
        if used.size:
            # used is sorted: slot_sorted[i] is the slot of adapter used[i].
            slot_sorted = np.array(self.state.assign_slots([(i, self.resident[i]) for i in used.tolist()]),
                                   dtype=np.int32)
            adapted = ids > 0
            slots[adapted] = slot_sorted[np.searchsorted(used, ids[adapted])]
        self.state.set_step(slots)

    def clear_step(self) -> None:
        """No adapter for any token (profile / warm-up / dummy runs)."""
        self.state.clear_step()

    # -- engine RPCs (add_lora / remove_lora / pin_lora / list_loras) -------------------
    def add_adapter(self, lora_int_id: int, name: str, path: str, load_inplace: bool = False) -> bool:
        """Validate an adapter and, once the pool exists, pack it into the host cache.

        Raises AdapterError with the adapter's name and the problem. The version
        follows the scheduler's numbering (1 on first registration, +1 per in-place
        reload); a wrong guess only costs a later cache miss, never stale weights
        (host_cache.py checks the file on every hit).
        """
        _, _, version = self.known.get(lora_int_id, (name, path, 0))
        version = version + 1 if load_inplace or version == 0 else version
        if self.host_cache is None:
            from vllm_slora.adapters import inspect_adapter

            inspect_adapter(name, path, self.base, max_lora_rank=self.max_lora_rank,
                            tp_size=self.tp_size, allow_pickle=self.allow_pickle)
        else:
            self.host_cache.get(name, path, version)
        self.known[lora_int_id] = (name, path, version)
        return True

    def remove_adapter(self, lora_int_id: int) -> bool:
        """Drop an adapter's host-cache copy (unload). Its pool pages belong to the
        scheduler, which evicts them once no running request reads them."""
        entry = self.known.pop(lora_int_id, None)
        with self._events_lock:
            for key, owner in self._owned_keys.pop(lora_int_id, ()):
                owners = self._key_owners.get(key)
                if owners is not None:
                    owners.discard(owner)
                    if not owners:
                        del self._key_owners[key]
        if entry is None:
            return False
        if self.host_cache is not None:
            self.host_cache.drop_path(entry[1])
        return True

    def pin_adapter(self, lora_int_id: int) -> bool:
        entry = self.known.get(lora_int_id)
        return bool(entry and self.host_cache and self.host_cache.pin_path(entry[1]))

    def list_adapters(self) -> set[int]:
        return set(self.known) | set(self.resident)

    def supports_tower_connector_lora(self) -> bool:
        # Read by vLLM's runner for multimodal encoders (it takes this object's place
        # as `lora_manager`); LoRA on vision towers is not served.
        return False
