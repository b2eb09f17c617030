"""The row tables the paged LoRA ops read, allocated once and rewritten one slot at a time.

An adapter *slot* is one row of every table: the ops index the tables with the
token->slot map (``token_adapter``). The tables have static shapes fixed at start-up::

    a_offsets        int64   [L, S_max, n_slices, R]   pool offset of row j of A_s
    b_offsets        int64   [L, S_max, n_slices, R]   pool offset of row j of B_s^T
    a_ranks, b_ranks int32   [L, S_max, n_slices]      rows used, 0 = slice absent
    scalings         float32 [L, S_max, n_slices]
    b_chunk_offsets  int64   [tp, L, S_max, n_slices, R] or None (column-parallel, tp > 1)

(``L`` = layers, ``S_max`` = slots = the most distinct adapters one step may use, ``R``
= the largest row count any adapter can have). Writes go through `write` / `clear`
with in-place copies, so every tensor keeps its address for the life of the engine: a
torch.compile trace or a CUDA graph captured once stays valid whatever adapters later
occupy the slots. Entries past a slot's rank are never read by any backend.

This is the only table builder: the worker writes resident adapters into slots
(vllm_slora/paged/step_metadata.py) and tests/benchmarks build theirs with
`build_row_tables` below, which goes through the same `write`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class SlotTables:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_slices: int,
        max_rows: int,
        device: torch.device | str = "cpu",
        tp_chunks: int = 0,  # > 0: keep b_chunk_offsets for that many TP chunks
    ) -> None:
        assert num_layers > 0 and num_slots > 0 and num_slices > 0 and max_rows > 0
        i64 = dict(dtype=torch.int64, device=device)
        self.num_slots, self.max_rows = num_slots, max_rows
        shape = (num_layers, num_slots, num_slices)
        self.a_offsets = torch.zeros(*shape, max_rows, **i64)
        self.b_offsets = torch.zeros(*shape, max_rows, **i64)
        self.a_ranks = torch.zeros(shape, dtype=torch.int32, device=device)
        self.b_ranks = torch.zeros(shape, dtype=torch.int32, device=device)
        self.scalings = torch.zeros(shape, dtype=torch.float32, device=device)
        self.b_chunk_offsets = torch.zeros(tp_chunks, *shape, max_rows, **i64) if tp_chunks else None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every table tensor (for identity checks: they never change address)."""
        found = (self.a_offsets, self.b_offsets, self.a_ranks, self.b_ranks, self.scalings)
        return found + ((self.b_chunk_offsets,) if self.b_chunk_offsets is not None else ())

    def write(
        self,
        slot: int,
        a_offsets: torch.Tensor,  # int64 [L, n_slices, r_a]
        b_offsets: torch.Tensor,  # int64 [L, n_slices, r_b]
        a_ranks: torch.Tensor,  # int32 [L, n_slices]
        b_ranks: torch.Tensor,  # int32 [L, n_slices]
        scalings: torch.Tensor,  # float32 [L, n_slices]
        b_chunk_offsets: torch.Tensor | None = None,  # int64 [tp, L, n_slices, r_c]
    ) -> None:
        """Put one adapter's rows in ``slot`` (in place; nothing is reallocated)."""
        assert 0 <= slot < self.num_slots, f"slot {slot} out of [0, {self.num_slots})"
        for name, rows in (("A", a_offsets), ("B", b_offsets)):
            assert rows.shape[-1] <= self.max_rows, (
                f"{name} has {rows.shape[-1]} rows; the tables were sized for {self.max_rows} "
                "(max_lora_rank, padded to the TP size)"
            )
        self.a_offsets[:, slot, :, : a_offsets.shape[-1]].copy_(a_offsets, non_blocking=True)
        self.b_offsets[:, slot, :, : b_offsets.shape[-1]].copy_(b_offsets, non_blocking=True)
        self.a_ranks[:, slot].copy_(a_ranks, non_blocking=True)
        self.b_ranks[:, slot].copy_(b_ranks, non_blocking=True)
        self.scalings[:, slot].copy_(scalings, non_blocking=True)
        if self.b_chunk_offsets is not None:
            assert b_chunk_offsets is not None, "these tables keep TP chunk offsets: pass them"
            self.b_chunk_offsets[:, :, slot, :, : b_chunk_offsets.shape[-1]].copy_(b_chunk_offsets, non_blocking=True)

    def write_many(
        self,
        slots: Sequence[int],  # distinct slots, one per adapter
        a_offsets: Sequence[torch.Tensor],  # per adapter int64 [L, n_slices, r_a]
        b_offsets: Sequence[torch.Tensor],  # per adapter int64 [L, n_slices, r_b]
        a_ranks: Sequence[torch.Tensor],  # per adapter int32 [L, n_slices]
        b_ranks: Sequence[torch.Tensor],  # per adapter int32 [L, n_slices]
        scalings: Sequence[torch.Tensor],  # per adapter float32 [L, n_slices]
        b_chunk_offsets: Sequence[torch.Tensor] | None = None,  # per adapter int64 [tp, L, n_slices, r_c]
    ) -> None:
        """Put several adapters' rows in their slots with one copy per table (in place).

        A step that brings k adapters into slots costs ~6 tensor ops instead of ~6 k: the
        per-call overhead, not the bytes, is what a switch costs (and on CUDA, launches).
        """
        if len(slots) == 1:
            chunks = b_chunk_offsets[0] if b_chunk_offsets is not None else None
            self.write(slots[0], a_offsets[0], b_offsets[0], a_ranks[0], b_ranks[0], scalings[0], chunks)
            return
        assert len(set(slots)) == len(slots) and all(0 <= s < self.num_slots for s in slots), slots
        index = torch.as_tensor(slots, dtype=torch.int64).to(self.a_offsets.device, non_blocking=True)
        self.a_offsets.index_copy_(1, index, self._stack_rows(a_offsets, "A", 1))
        self.b_offsets.index_copy_(1, index, self._stack_rows(b_offsets, "B", 1))
        self.a_ranks.index_copy_(1, index, torch.stack(list(a_ranks), dim=1))
        self.b_ranks.index_copy_(1, index, torch.stack(list(b_ranks), dim=1))
        self.scalings.index_copy_(1, index, torch.stack(list(scalings), dim=1))
        if self.b_chunk_offsets is not None:
            assert b_chunk_offsets is not None, "these tables keep TP chunk offsets: pass them"
            self.b_chunk_offsets.index_copy_(2, index, self._stack_rows(b_chunk_offsets, "B chunk", 2))

    def _stack_rows(self, rows: Sequence[torch.Tensor], name: str, dim: int) -> torch.Tensor:
        """Row tables stacked along `dim`, each padded to max_rows (entries past a rank are never read)."""
        widths = {t.shape[-1] for t in rows}
        assert max(widths) <= self.max_rows, (
            f"{name} has {max(widths)} rows; the tables were sized for {self.max_rows} "
            "(max_lora_rank, padded to the TP size)"
        )
        if widths != {self.max_rows}:
            rows = [torch.nn.functional.pad(t, (0, self.max_rows - t.shape[-1])) for t in rows]
        return torch.stack(list(rows), dim=dim)

    def clear(self, slot: int) -> None:
        """No rows in ``slot`` (a token mapped to it would get no delta)."""
        self.a_ranks[:, slot].zero_()
        self.b_ranks[:, slot].zero_()
        self.scalings[:, slot].zero_()


@dataclass(frozen=True)
class RowTables:
    """One layer's tables as the ops take them (a view of a `SlotTables`, L = 1)."""

    a_row_offsets: torch.Tensor  # int64 [A, n_slices, R]
    b_row_offsets: torch.Tensor  # int64 [A, n_slices, R]
    ranks: torch.Tensor  # int32 [A, n_slices], 0 = slice absent
    scalings: torch.Tensor  # float32 [A, n_slices]


def build_row_tables(
    adapters: Sequence,  # PackedRows (kernels/packing.py): per slice A and B^T row offsets
    scalings: Sequence[Sequence[float]],  # per adapter, per slice
    device: torch.device | str = "cpu",
    max_rank: int | None = None,
) -> RowTables:
    """Slot i = adapter i, in one-layer `SlotTables` (the production table writer)."""
    num_slices = len(adapters[0].a_offsets)
    width = max_rank or max(1, max(max(p.ranks) for p in adapters))
    tables = SlotTables(1, len(adapters), num_slices, width, device)
    for slot, (packed, scale) in enumerate(zip(adapters, scalings)):
        ranks = torch.tensor([list(packed.ranks)], dtype=torch.int32)
        tables.write(
            slot,
            _stack_rows(packed.a_offsets),
            _stack_rows(packed.b_offsets),
            ranks,
            ranks,
            torch.tensor([list(scale)], dtype=torch.float32).reshape(1, num_slices),
        )
    return RowTables(tables.a_offsets[0], tables.b_offsets[0], tables.a_ranks[0], tables.scalings[0])


def _stack_rows(per_slice: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 [1, n_slices, max r]: per-slice row offsets, zero-padded."""
    width = max(1, max(t.numel() for t in per_slice))
    out = torch.zeros(1, len(per_slice), width, dtype=torch.int64)
    for s, rows in enumerate(per_slice):
        out[0, s, : rows.numel()] = rows
    return out
