"""The one metadata contract every LoRA backend reads: static shapes, updated in place.

Allocated once per worker when the model is built, before vLLM traces or captures it:

    token_adapter   int32 [max_tokens]       slot of every token of the step, -1 = none;
                                             entries past the step's tokens stay -1, so a
                                             padded batch never picks up an adapter
    tables[module]  SlotTables               [layers, slots, n_slices, max_rows] row tables
                                             (kernels/slot_tables.py)
    meta            PagedLoRAMeta | None     Triton segment grouping over all max_tokens
                                             entries (CUDA + Triton only)

Before each forward `set_step` writes the step's token->slot map (a pinned host buffer
copied into the device tensor on CUDA) and `assign_slots` writes the rows of adapters
that are new to their slot, all of a step's at once; nothing is ever reallocated, so a graph traced or captured
in a step without adapters reads the live tables in every later step. Slots are sticky:
an adapter keeps its slot while it stays resident and slots are handed out least
recently used first, so a steady adapter set costs no table writes at all. At most
``num_slots`` distinct adapters run in one step (vLLM's scheduler enforces this
through ``--max-loras``, see vllm_slora/activation.py).

Host-side fields (`any_adapter`, the token plan) exist for the CPU backends only; the
CUDA path never branches on per-step state.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .adapter_tables import ResidentAdapter
from .modules import SLICE_RANGE
from .ops import PagedLoRAMeta, SlotTables, TokenPlan, plan_tokens


class StepMetadata:
    def __init__(
        self,
        num_layers: int,
        max_tokens: int,
        num_slots: int,
        max_rows: int,
        device: torch.device | str,
        *,
        chunked_modules: tuple[str, ...] = (),  # column-parallel modules at tp > 1
        tp_size: int = 1,
        segment_meta: bool = False,  # keep a PagedLoRAMeta (Triton on CUDA)
    ) -> None:
        assert max_tokens > 0 and num_slots > 0 and max_rows > 0
        self.device = torch.device(device)
        self.num_layers, self.max_tokens, self.num_slots, self.max_rows = num_layers, max_tokens, num_slots, max_rows
        self.token_adapter = torch.full((max_tokens,), -1, dtype=torch.int32, device=self.device)
        on_cuda = self.device.type == "cuda"
        # The host side of token_adapter: pinned on CUDA so the copy is truly asynchronous.
        self._token_host = (
            torch.full((max_tokens,), -1, dtype=torch.int32, pin_memory=True) if on_cuda else self.token_adapter
        )
        # Set once the device has read the host buffer; the next step waits for it before
        # rewriting the buffer (with async scheduling the CPU can run a step ahead).
        self._host_read = torch.cuda.Event() if on_cuda else None
        self.tables = {
            name: SlotTables(num_layers, num_slots, hi - lo, max_rows, self.device,
                             tp_chunks=tp_size if name in chunked_modules else 0)
            for name, (lo, hi) in SLICE_RANGE.items()
        }
        self.meta = PagedLoRAMeta(max_tokens, num_slots, self.device) if segment_meta else None
        # Per decoder layer: the layer's KV tensor as a flat array (attach_pool). The
        # ops look pools up at call time, so the KV cache may come after tracing.
        self.pools: list[torch.Tensor] = []
        self._no_pool = torch.empty(0, device=self.device)
        # Slot bookkeeping (host only).
        self.slot_of: dict[int, int] = {}  # lora_int_id -> slot
        self._content: list[ResidentAdapter | None] = [None] * num_slots
        self._last_step = [-1] * num_slots
        self.generation = [0] * num_slots  # bumped whenever a slot's rows change
        self.table_writes = 0  # adapters written into slots so far (a switch-cost counter)
        self.step = 0
        # CPU backends: how many tokens this step maps, and whether any has an adapter.
        self.num_mapped = 0
        self.any_adapter = False
        self._plan: tuple[int, int, TokenPlan] | None = None  # (step, T, plan)
        self._runs: dict = {}

    # -- tensors every backend reads -------------------------------------------------
    def pool(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """The layer's flat pool, or an empty stand-in before the KV cache exists."""
        if self.pools:
            return self.pools[layer]
        return self._no_pool.to(dtype)

    def static_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the contract (for identity checks: addresses never change)."""
        found = [self.token_adapter]
        for tables in self.tables.values():
            found += tables.tensors()
        if self.meta is not None:
            found += [self.meta.token_order, self.meta.adapter_starts, self.meta.tiles]
        return found

    # -- per step ----------------------------------------------------------------------
    def assign_slots(self, adapters: Sequence[tuple[int, ResidentAdapter]]) -> list[int]:
        """Slots of one step's adapters ((lora_int_id, adapter), distinct ids), in order.

        Adapters already in a slot with these rows keep it at no cost; the others take the
        least recently used slots no adapter of this step holds (empty ones first), and all
        their rows are written together (one copy per table, `SlotTables.write_many`).
        """
        in_step = {lora_int_id for lora_int_id, _ in adapters}
        slots: list[int | None] = []
        writes: list[int] = []  # positions in `adapters` whose rows go into their slot
        for position, (lora_int_id, adapter) in enumerate(adapters):
            slot = self.slot_of.get(lora_int_id)
            if slot is None or self._content[slot] is not adapter:
                writes.append(position)
            slots.append(slot)
        homeless = [p for p in writes if slots[p] is None]
        if homeless:
            for position, slot in zip(homeless, self._free_slots(in_step, len(homeless))):
                slots[position] = slot
        for slot in slots:
            self._last_step[slot] = self.step
        if writes:
            self._write([(slots[p], *adapters[p]) for p in writes])
        return slots

    def _free_slots(self, in_step: set[int], count: int) -> list[int]:
        """`count` slots for adapters new to the step's tables, their previous owners evicted."""
        candidates = [s for s in range(self.num_slots) if self._owner(s) not in in_step]
        if len(candidates) < count:
            raise RuntimeError(
                f"vllm-slora: more than {self.num_slots} distinct adapters in one step "
                "(the scheduler must cap them with max_loras)"
            )
        # Empty slots first, then the least recently used (ties: lowest slot, as sorted()).
        chosen = heapq.nsmallest(count, candidates, key=lambda s: (self._content[s] is not None, self._last_step[s]))
        for slot in chosen:
            owner = self._owner(slot)
            if owner is not None:
                del self.slot_of[owner]
        return chosen

    def _owner(self, slot: int) -> int | None:
        content = self._content[slot]
        return None if content is None else content.lora_int_id

    def _write(self, writes: Sequence[tuple[int, int, ResidentAdapter]]) -> None:
        """(slot, lora_int_id, adapter) each: the adapters' rows into their slots, all at once."""
        slots = [slot for slot, _, _ in writes]
        for name, tables in self.tables.items():
            rows = [adapter.modules[name] for _, _, adapter in writes]
            chunks = [r.b_chunk_offsets for r in rows] if tables.b_chunk_offsets is not None else None
            tables.write_many(slots, [r.a_offsets for r in rows], [r.b_offsets for r in rows],
                              [r.a_ranks for r in rows], [r.b_ranks for r in rows], [r.scalings for r in rows],
                              chunks)
        for slot, lora_int_id, adapter in writes:
            self._content[slot] = adapter
            self.slot_of[lora_int_id] = slot
            self.generation[slot] += 1
        self.table_writes += len(writes)

    def release(self, lora_int_id: int) -> None:
        """The adapter's pages are gone: empty its slot."""
        slot = self.slot_of.pop(lora_int_id, None)
        if slot is None:
            return
        for tables in self.tables.values():
            tables.clear(slot)
        self._content[slot] = None
        self.generation[slot] += 1

    def release_all(self) -> None:
        for lora_int_id in list(self.slot_of):
            self.release(lora_int_id)

    def set_step(self, token_slots: np.ndarray) -> None:
        """Write the step's token->slot map (int32 [T], -1 = none) into token_adapter."""
        num_tokens = int(token_slots.size)
        if num_tokens > self.max_tokens:
            raise RuntimeError(f"vllm-slora: {num_tokens} tokens in a step sized for {self.max_tokens}")
        host = self._token_host
        if self._host_read is not None:
            self._host_read.synchronize()
        host[:num_tokens].copy_(torch.from_numpy(np.ascontiguousarray(token_slots, dtype=np.int32)))
        if self.num_mapped > num_tokens:
            host[num_tokens : self.num_mapped].fill_(-1)
        if host is not self.token_adapter:
            self.token_adapter.copy_(host, non_blocking=True)
            self._host_read.record()
        if self.meta is not None:
            self.meta.prepare(self.token_adapter)
        self.num_mapped = num_tokens
        self.any_adapter = bool((token_slots >= 0).any())
        self.step += 1

    def clear_step(self) -> None:
        """No adapter for any token (profile / warm-up / dummy runs)."""
        self.set_step(np.empty(0, dtype=np.int32))

    # -- CPU torch path: host-side grouping and pool views, cached ----------------------
    def token_plan(self, num_tokens: int) -> TokenPlan:
        """The step's tokens grouped by slot (host sync: CPU only), once per step."""
        if self._plan is None or self._plan[:2] != (self.step, num_tokens):
            plan = plan_tokens(self.token_adapter[:num_tokens], self.num_slots)
            self._plan = (self.step, num_tokens, plan)
        return self._plan[2]

    def slot_runs(self, key: tuple, slots: list[int], compute: Callable[[int], list]) -> dict[int, list]:
        """{slot: compute(slot)} with each value cached until the slot is rewritten."""
        cache = self._runs.setdefault(key, {})
        found = {}
        for slot in slots:
            entry = cache.get(slot)
            if entry is None or entry[0] != self.generation[slot]:
                entry = cache[slot] = (self.generation[slot], compute(slot))
            found[slot] = entry[1]
        return found
