"""Where a resident adapter's rows are, and the per-step tables the kernels read.

`ResidentAdapter` is built once when an adapter's pages are filled and lives until the
scheduler reports it evicted; the step metadata copies its rows into a slot of the
static per-module tables when a step first uses it (step_metadata.py).

Tensor parallelism (column-parallel modules, tp > 1): a rank holds ``r_pad / tp`` rows
of A but all ``r_pad`` rows of B^T (vllm_slora/adapters/base_model.py). After the
shrink is all-gathered, chunk ``k`` of the gathered vector holds rows
``[k * r_pad/tp, (k+1) * r_pad/tp)`` of the full one, so the expand runs once per chunk
with the B^T rows of that chunk: `ModuleRows.b_chunk_offsets`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_slora.adapters.modules import COLUMN_PARALLEL

from .modules import PAGED_MODULES, SLICE_RANGE
from .packing import PackedAdapter


@dataclass(frozen=True)
class ModuleRows:
    """One module's rows of one adapter (all layers) or of one step (all adapters)."""

    a_offsets: torch.Tensor  # int64 [L, (A,) n_slices, R]: pool offset of every A row
    b_offsets: torch.Tensor  # int64 [L, (A,) n_slices, R]: pool offset of every B^T row
    a_ranks: torch.Tensor  # int32 [L, (A,) n_slices]: A rows used (the LoRA rank at tp=1)
    b_ranks: torch.Tensor  # int32 [L, (A,) n_slices]: B^T rows used
    scalings: torch.Tensor  # float32 [L, (A,) n_slices]; 0 where the slice is untargeted
    # Column-parallel modules at tp > 1 only: int64 [tp, L, (A,) n_slices, R], the B^T rows
    # that multiply chunk k of the all-gathered shrink (k * a_ranks + j); None otherwise.
    b_chunk_offsets: torch.Tensor | None = None

    @property
    def max_rows(self) -> int:
        return self.a_offsets.shape[-1]


@dataclass(frozen=True)
class ResidentAdapter:
    lora_int_id: int
    version: int
    block_ids: tuple[int, ...]
    modules: dict[str, ModuleRows]  # vLLM module name -> rows, [L, n_slices, R]


def resident_adapter(
    lora_int_id: int, packed: PackedAdapter, block_ids: Sequence[int], device: torch.device | str,
    rows_width: int | None = None,  # pad row tables to this many rows (the slot tables' max_rows)
) -> ResidentAdapter:
    """Translate the packed adapter's relative rows to offsets in ``block_ids``' pages.

    With ``rows_width`` every row table already has the slot tables' width, so a step
    writes many adapters into slots with one stacked copy per table and no padding.
    """
    pe = packed.page_elems
    blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)
    num_layers = len(packed.relative_rows)
    scalings = packed.spec.scalings()  # [L, 7]
    modules = {}
    for name, (lo, hi) in SLICE_RANGE.items():
        n = hi - lo
        # Rows are [A_s, B_s^T] per slice: matrices 2s and 2s+1 of a layer.
        width = max(1, max(rows[2 * s + k].numel() for rows in packed.relative_rows
                           for s in range(lo, hi) for k in (0, 1)))
        if rows_width is not None and rows_width > width:
            width = rows_width
        tables = [torch.zeros(num_layers, n, width, dtype=torch.int64) for _ in range(2)]
        counts = torch.zeros(2, num_layers, n, dtype=torch.int32)
        for layer, rows in enumerate(packed.relative_rows):
            for i, s in enumerate(range(lo, hi)):
                for k in (0, 1):
                    rel = rows[2 * s + k]
                    tables[k][layer, i, : rel.numel()] = blocks[rel // pe] * pe + rel % pe
                    counts[k, layer, i] = rel.numel()
        chunks = None
        if packed.tp_size > 1 and PAGED_MODULES[name][0] in COLUMN_PARALLEL:
            chunks = _b_chunk_offsets(tables[1], counts[0], packed.tp_size, tables[0].shape[-1]).to(device)
        modules[name] = ModuleRows(
            a_offsets=tables[0].to(device),
            b_offsets=tables[1].to(device),
            a_ranks=counts[0].to(device),
            b_ranks=counts[1].to(device),
            scalings=scalings[:, lo:hi].contiguous().to(device),
            b_chunk_offsets=chunks,
        )
    return ResidentAdapter(lora_int_id, packed.spec.version, tuple(block_ids), modules)


def _b_chunk_offsets(
    b_offsets: torch.Tensor,  # int64 [L, n_slices, R_b]: all r_pad B^T rows of a slice
    a_rows: torch.Tensor,  # int32 [L, n_slices]: A rows on this rank (r_pad / tp)
    tp_size: int,
    width: int,
) -> torch.Tensor:
    """int64 [tp, L, n_slices, width]: chunk k's B^T rows, k * a_rows .. (k+1) * a_rows."""
    num_layers, num_slices, _ = b_offsets.shape
    chunks = torch.zeros(tp_size, num_layers, num_slices, width, dtype=torch.int64)
    for layer in range(num_layers):
        for s, rows in enumerate(a_rows[layer].tolist()):
            for k in range(tp_size):
                chunks[k, layer, s, :rows] = b_offsets[layer, s, k * rows : (k + 1) * rows]
    return chunks
