"""Dense LoRA A/B matrices -> rows in pool pages, and the row tables the ops read.

One layer of one adapter is the matrix list ``A_0, B_0^T, A_1, B_1^T, ...`` (one pair
per slice) placed by `page_layout.plan_layout`. The worker packs adapters with
`pack_lora_layer`; tests and benchmarks use it to build pools from dense weights, so the
oracle (dense math on the original matrices) never goes through the code under test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .page_layout import AdapterPageLayout, MatrixSpec, plan_layout


def lora_matrix_specs(ranks: Sequence[int], in_features: int, out_sizes: Sequence[int]) -> list[MatrixSpec]:
    """``A_s`` (rank_s x in) then ``B_s^T`` (rank_s x out_s) for every slice s."""
    specs = []
    for rank, out_features in zip(ranks, out_sizes):
        specs += [MatrixSpec(rank, in_features), MatrixSpec(rank, out_features)]
    return specs


def lora_layer_layout(
    ranks: Sequence[int], in_features: int, out_sizes: Sequence[int], page_elems: int
) -> AdapterPageLayout:
    return plan_layout(lora_matrix_specs(ranks, in_features, out_sizes), page_elems)


@dataclass(frozen=True)
class PackedRows:
    """Pool offsets of one adapter's rows for one layer."""

    a_offsets: tuple[torch.Tensor, ...]  # per slice: int64 [rank_s]
    b_offsets: tuple[torch.Tensor, ...]  # per slice: int64 [rank_s]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(o.numel() for o in self.a_offsets)


def pack_lora_layer(
    pool: torch.Tensor,  # [num_blocks * page_elems] flat, adapter dtype; written in place
    page_elems: int,
    block_ids: Sequence[int],
    lora_a: Sequence[torch.Tensor],  # per slice: [rank_s, in_features]
    lora_b: Sequence[torch.Tensor],  # per slice: [out_s, rank_s]
) -> PackedRows:
    """Write one layer of one adapter into ``pool`` pages of ``block_ids``; return its rows."""
    assert pool.dim() == 1, f"pool must be flat, got shape {tuple(pool.shape)}"
    assert len(lora_a) == len(lora_b), "one A and one B per slice"
    in_features = lora_a[0].shape[1]
    ranks = [a.shape[0] for a in lora_a]
    out_sizes = [b.shape[0] for b in lora_b]
    for a, b in zip(lora_a, lora_b):
        assert a.shape[1] == in_features, "all slices share in_features"
        assert b.shape[1] == a.shape[0], f"B {tuple(b.shape)} does not match A {tuple(a.shape)}"
    layout = lora_layer_layout(ranks, in_features, out_sizes, page_elems)
    row_offsets = layout.row_offsets(block_ids)
    matrices = [m for a, b in zip(lora_a, lora_b) for m in (a, b.t())]
    for matrix, starts in zip(matrices, row_offsets):
        write_rows(pool, starts, matrix)
    return PackedRows(tuple(row_offsets[0::2]), tuple(row_offsets[1::2]))


def write_rows(
    flat: torch.Tensor,  # [N] flat pages, written in place
    row_starts: torch.Tensor,  # int64 [rows]: where each row of `matrix` begins in `flat`
    matrix: torch.Tensor,  # [rows, row_len]
) -> None:
    """Row j of ``matrix`` -> ``flat[row_starts[j] : row_starts[j] + row_len]`` (the one packer)."""
    if row_starts.numel() == 0:
        return
    assert matrix.shape[0] == row_starts.numel(), f"{matrix.shape[0]} rows for {row_starts.numel()} row starts"
    index = row_starts[:, None] + torch.arange(matrix.shape[1], dtype=torch.int64)  # [rows, row_len]
    flat.index_copy_(0, index.reshape(-1).to(flat.device), matrix.reshape(-1).to(flat.dtype).to(flat.device))
