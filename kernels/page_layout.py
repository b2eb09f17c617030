"""Where an adapter's LoRA weights sit inside unified-pool pages.

This is the one place that defines the page layout shared by the scheduler (how many
blocks an adapter needs), the worker (packing host weights into pages) and the kernels
(reading weights straight from pages). Imports torch only.

Pool model
----------
vLLM gives every layer ``l`` one KV tensor; block id ``b`` owns one page of
``page_bytes`` in every layer. Viewed as the adapter dtype, layer ``l``'s tensor is a
flat array ``pool_l`` of ``num_blocks * page_elems`` elements and page ``b`` is
``pool_l[b * page_elems : (b + 1) * page_elems]``. An adapter holding blocks
``block_ids`` stores its layer-``l`` weights in layer ``l``'s pages of those blocks.

Rows, not bytes
---------------
The weights of one layer are a sequence of *matrices*, each a stack of equal-length
rows: for every LoRA slice ``s`` (q, k, v of a packed QKV, gate/up, ...):

* ``A_s``   rank_s rows of length ``in_features_s``   (row j = A[j, :])
* ``B_s^T`` rank_s rows of length ``out_features_s``  (row j = B[:, j])

Storing B transposed makes both shrink and expand read whole contiguous rows. Rows are
laid out one after another in the adapter's logical page sequence and **never straddle
a page boundary** (a row that does not fit the rest of a page starts the next page).
So a kernel addresses row ``j`` of a matrix with one integer per row (its element
offset in ``pool_l``) and then reads it contiguously; the waste is below one row per
matrix boundary. Every layer of the same model uses the same matrix list, so one
row-offset table serves all layers (offsets are relative to the layer's base).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MatrixSpec:
    """One stack of equal-length rows (a LoRA A, or a transposed LoRA B)."""

    rows: int  # the LoRA rank of this slice
    row_len: int  # in_features for A, out_features for B^T

    def __post_init__(self) -> None:
        if self.rows < 0 or self.row_len <= 0:
            raise ValueError(f"bad matrix spec rows={self.rows} row_len={self.row_len}")


@dataclass(frozen=True)
class MatrixPlacement:
    """Where one matrix starts in an adapter's logical pages, and how it continues."""

    rows: int
    row_len: int
    first_page: int  # logical page index (0 = the adapter's first block)
    first_offset: int  # element offset of row 0 inside that page
    first_page_rows: int  # rows that fit after first_offset on the first page
    rows_per_page: int  # rows a fresh page holds: page_elems // row_len

    def row_location(self, j: int) -> tuple[int, int]:
        """(logical page, element offset in page) of row ``j``."""
        if j < self.first_page_rows:
            return self.first_page, self.first_offset + j * self.row_len
        k = j - self.first_page_rows
        return self.first_page + 1 + k // self.rows_per_page, (k % self.rows_per_page) * self.row_len


@dataclass(frozen=True)
class AdapterPageLayout:
    """The placement of every matrix of one layer, and the pages that takes."""

    page_elems: int
    placements: tuple[MatrixPlacement, ...]
    num_pages: int

    def row_offsets(self, block_ids: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        """Element offset in ``pool_l`` of every row of every matrix.

        Returns one int64 tensor ``[rows]`` per placement, in placement order.
        """
        blocks = torch.as_tensor(block_ids, dtype=torch.int64)
        if blocks.numel() < self.num_pages:
            raise ValueError(f"layout needs {self.num_pages} blocks, got {blocks.numel()}")
        out = []
        for p in self.placements:
            pages = torch.empty(p.rows, dtype=torch.int64)
            offs = torch.empty(p.rows, dtype=torch.int64)
            for j in range(p.rows):
                pages[j], offs[j] = p.row_location(j)
            out.append(blocks[pages] * self.page_elems + offs)
        return out


def plan_layout(matrices: Sequence[MatrixSpec], page_elems: int) -> AdapterPageLayout:
    """Place ``matrices`` in order into pages of ``page_elems`` elements.

    Raises ValueError when a single row is longer than a page (that model/page-size
    pair cannot hold LoRA rows; pick a larger block size).
    """
    if page_elems <= 0:
        raise ValueError(f"page_elems must be positive, got {page_elems}")
    page, offset = 0, 0
    placements = []
    for m in matrices:
        if m.row_len > page_elems:
            raise ValueError(
                f"a LoRA row of {m.row_len} elements does not fit a page of {page_elems} "
                "elements; use a larger KV block size"
            )
        if m.rows and offset + m.row_len > page_elems:
            page, offset = page + 1, 0
        placements.append(
            MatrixPlacement(
                rows=m.rows,
                row_len=m.row_len,
                first_page=page,
                first_offset=offset,
                first_page_rows=(page_elems - offset) // m.row_len,
                rows_per_page=page_elems // m.row_len,
            )
        )
        for _ in range(m.rows):
            if offset + m.row_len > page_elems:
                page, offset = page + 1, 0
            offset += m.row_len
    used = page + (1 if offset > 0 else 0)
    return AdapterPageLayout(page_elems, tuple(placements), used)


def dense_pages(matrices: Sequence[MatrixSpec], page_elems: int) -> int:
    """The lower bound ceil(adapter elements / page elements), for comparison."""
    return math.ceil(sum(m.rows * m.row_len for m in matrices) / page_elems)
