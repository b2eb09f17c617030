"""An adapter packed into its page layout on the host, ready to be copied into blocks.

Packing happens once per adapter (per TP rank) when it enters the host cache; putting
it into the pool is then one page-granular copy per layer (page_writer.py), whatever
blocks the scheduler chose. Row positions are kept *relative* to the adapter's first
logical page (``logical_page * page_elems + offset``), so they are block-independent
and translate to pool offsets with one vectorized step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vllm_slora.adapters import AdapterSpec, load_adapter_weights

from .ops import write_rows


@dataclass(frozen=True)
class PackedAdapter:
    spec: AdapterSpec
    tp_size: int
    tp_rank: int
    page_elems: int
    # Per layer: [pages_l, page_elems] in the model dtype; pages_l <= num_pages.
    pages: tuple[torch.Tensor, ...]
    # Per layer: 14 int64 tensors [rows] (A_s, B_s^T for s in SLICE_ORDER), the element
    # offset of every row relative to the adapter's first page.
    relative_rows: tuple[tuple[torch.Tensor, ...], ...]

    @property
    def num_pages(self) -> int:
        """Blocks the adapter occupies (the largest per-layer page count)."""
        return max(p.shape[0] for p in self.pages)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.pages)


def relative_row_offsets(spec: AdapterSpec, layer: int, page_elems: int, tp_size: int, tp_rank: int):
    """(pages used, 14 relative row-offset tensors) of one layer's layout."""
    layout = spec.layer_layout(layer, page_elems, tp_size, tp_rank)
    # With block ids 0..n-1 the pool offsets *are* the relative offsets.
    return layout.num_pages, tuple(layout.row_offsets(range(layout.num_pages)))


def pack_adapter(
    spec: AdapterSpec, page_elems: int, dtype: torch.dtype, tp_size: int = 1, tp_rank: int = 0,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> PackedAdapter:
    """Read the adapter from disk (or take its PEFT-keyed ``tensors``), in ``dtype``, and lay its rows out in pages."""
    weights = load_adapter_weights(spec, dtype=dtype, tensors=tensors)
    # Layers with the same slice ranks share a layout; planning it walks every row in
    # Python, so do it once per distinct rank tuple.
    layouts: dict[tuple[int, ...], tuple[int, tuple[torch.Tensor, ...]]] = {}
    all_pages, all_rows = [], []
    for layer, layer_ranks in enumerate(spec.ranks().tolist()):
        key = tuple(layer_ranks)
        if key not in layouts:
            layouts[key] = relative_row_offsets(spec, layer, page_elems, tp_size, tp_rank)
        num_pages, rows = layouts[key]
        flat = torch.zeros(num_pages * page_elems, dtype=dtype)  # [pages * page_elems]
        for matrix, row_starts in zip(weights.page_matrices(layer, tp_size, tp_rank), rows):
            write_rows(flat, row_starts, matrix)
        all_pages.append(flat.view(num_pages, page_elems))
        all_rows.append(rows)
    return PackedAdapter(spec, tp_size, tp_rank, page_elems, tuple(all_pages), tuple(all_rows))
