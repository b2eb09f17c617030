"""Paged LoRA expand in Triton: y[t, slice s] += scaling * buf[s, t, :rank] @ B_s^T.

Row j of B_s^T(a) (i.e. column j of B) is ``out_s`` contiguous elements at
``pool + b_row_offsets[a, s, j]``, so an output tile reads a [rank, BLOCK_N] block of
rows, contiguous along N. The rank loop stops at the adapter's own rank (no padding).
Slices are packed side by side in ``y`` (QKV: 3, gate/up: 2) with widths passed as
scalars, so one launch covers all slices. Programs of tokens without adapter, of
slices an adapter lacks (rank 0) and of output tiles past a slice's width exit before
touching ``y``: those elements keep their exact bits.

Forms as in triton_shrink.py: per-token (decode, CUDA-core GEMV) and segment (prefill,
``tl.dot`` over a tile of tokens of one adapter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._triton_jit import dot_in_fp32, jitted
from .triton_config import get_launch_config

MAX_SLICES = 3  # slice widths travel as scalar arguments OUT_0..OUT_2


def _expand_token_kernel(
    buf_ptr,
    pool_ptr,
    row_offsets_ptr,
    ranks_ptr,
    scalings_ptr,
    token_adapter_ptr,
    y_ptr,
    out_0,
    out_1,
    out_2,
    buf_stride_s,
    buf_stride_t,
    offsets_stride_a,
    offsets_stride_s,
    ranks_stride_a,
    scalings_stride_a,
    y_stride_t,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slice_id = tl.program_id(1)
    n_tile = tl.program_id(2)
    adapter = tl.load(token_adapter_ptr + token)
    # Early exit for a token without adapter: y stays bit-identical.
    if adapter < 0:
        return
    slice_width = tl.where(slice_id == 0, out_0, tl.where(slice_id == 1, out_1, out_2))
    slice_start = tl.where(slice_id == 0, 0, tl.where(slice_id == 1, out_0, out_0 + out_1))
    rank = tl.load(ranks_ptr + adapter * ranks_stride_a + slice_id)
    if (rank == 0) | (n_tile * BLOCK_N >= slice_width):
        return
    scaling = tl.load(scalings_ptr + adapter * scalings_stride_a + slice_id)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < slice_width
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < rank
        coeff = tl.load(buf_ptr + slice_id * buf_stride_s + token * buf_stride_t + rows, mask=row_mask, other=0.0)
        starts = tl.load(
            row_offsets_ptr + adapter * offsets_stride_a + slice_id * offsets_stride_s + rows, mask=row_mask, other=0
        )
        w = tl.load(pool_ptr + starts[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * coeff[:, None]
    delta = tl.sum(acc, axis=0) * scaling
    y_ptrs = y_ptr + token * y_stride_t + slice_start + cols
    y_old = tl.load(y_ptrs, mask=col_mask)
    tl.store(y_ptrs, (y_old.to(tl.float32) + delta).to(y_old.dtype), mask=col_mask)


def _expand_segment_kernel(
    buf_ptr,
    pool_ptr,
    row_offsets_ptr,
    ranks_ptr,
    scalings_ptr,
    token_order_ptr,
    tiles_ptr,
    y_ptr,
    out_0,
    out_1,
    out_2,
    buf_stride_s,
    buf_stride_t,
    offsets_stride_a,
    offsets_stride_s,
    ranks_stride_a,
    scalings_stride_a,
    tiles_stride,
    y_stride_t,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    tile = tl.program_id(0)
    slice_id = tl.program_id(1)
    n_tile = tl.program_id(2)
    adapter = tl.load(tiles_ptr + tile)
    # Early exit for tiles past the batch's last one (the grid is an upper bound).
    if adapter < 0:
        return
    slice_width = tl.where(slice_id == 0, out_0, tl.where(slice_id == 1, out_1, out_2))
    slice_start = tl.where(slice_id == 0, 0, tl.where(slice_id == 1, out_0, out_0 + out_1))
    rank = tl.load(ranks_ptr + adapter * ranks_stride_a + slice_id)
    if (rank == 0) | (n_tile * BLOCK_N >= slice_width):
        return
    scaling = tl.load(scalings_ptr + adapter * scalings_stride_a + slice_id)
    first = tl.load(tiles_ptr + tiles_stride + tile)
    length = tl.load(tiles_ptr + 2 * tiles_stride + tile)
    m = tl.arange(0, BLOCK_M)
    m_mask = m < length
    tokens = tl.load(token_order_ptr + first + m, mask=m_mask, other=0).to(tl.int64)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < slice_width
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < rank
        coeff = tl.load(
            buf_ptr + slice_id * buf_stride_s + tokens[:, None] * buf_stride_t + rows[None, :],
            mask=m_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        starts = tl.load(
            row_offsets_ptr + adapter * offsets_stride_a + slice_id * offsets_stride_s + rows, mask=row_mask, other=0
        )
        w = tl.load(pool_ptr + starts[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_IN_FP32:  # see dot_in_fp32()
            acc += tl.dot(coeff, w.to(tl.float32), input_precision="ieee")
        else:  # tensor cores take the weight dtype; the shrink result is rounded to it
            acc += tl.dot(coeff.to(w.dtype), w)
    y_ptrs = y_ptr + tokens[:, None] * y_stride_t + slice_start + cols[None, :]
    mask = m_mask[:, None] & col_mask[None, :]
    y_old = tl.load(y_ptrs, mask=mask)
    tl.store(y_ptrs, (y_old.to(tl.float32) + acc * scaling).to(y_old.dtype), mask=mask)


def _slice_widths(out_sizes: Sequence[int]) -> list[int]:
    assert 1 <= len(out_sizes) <= MAX_SLICES, f"the Triton expand takes 1..{MAX_SLICES} slices, got {len(out_sizes)}"
    return list(out_sizes) + [0] * (MAX_SLICES - len(out_sizes))


# Launch decisions here depend only on static quantities (the batch's T, the tables'
# n_slices and R, out_sizes, tile_tokens, the device): see the note in triton_shrink.py.


def expand_token(
    buf: torch.Tensor,  # float32 [n_slices, T, R], unit last stride
    pool: torch.Tensor,  # [N] flat, y.dtype
    b_row_offsets: torch.Tensor,  # int64 [A, n_slices, R], contiguous
    ranks: torch.Tensor,  # int32 [A, n_slices], contiguous
    scalings: torch.Tensor,  # float32 [A, n_slices], contiguous
    token_adapter: torch.Tensor,  # int32 [T]
    y: torch.Tensor,  # [T, sum(out_sizes)], unit column stride; updated in place
    out_sizes: Sequence[int],
) -> None:
    """Per-token (decode) form."""
    num_slices, num_tokens, max_rank = buf.shape
    config = get_launch_config(
        "expand_token", num_tokens=num_tokens, num_slices=num_slices, max_rank=max_rank, features=max(out_sizes),
        device=y.device,
    )  # fmt: skip
    grid = (num_tokens, num_slices, triton.cdiv(max(out_sizes), config["BLOCK_N"]))
    jitted(_expand_token_kernel)[grid](
        buf, pool, b_row_offsets, ranks, scalings, token_adapter, y,
        *_slice_widths(out_sizes),
        buf.stride(0), buf.stride(1), b_row_offsets.stride(0), b_row_offsets.stride(1),
        ranks.stride(0), scalings.stride(0), y.stride(0),
        **config,
    )  # fmt: skip


def expand_segment(
    buf: torch.Tensor,  # float32 [n_slices, T, R], unit last stride
    pool: torch.Tensor,  # [N] flat, y.dtype
    b_row_offsets: torch.Tensor,  # int64 [A, n_slices, R], contiguous
    ranks: torch.Tensor,  # int32 [A, n_slices], contiguous
    scalings: torch.Tensor,  # float32 [A, n_slices], contiguous
    token_order: torch.Tensor,  # int64 [>= T], PagedLoRAMeta.token_order
    tiles: torch.Tensor,  # int32 [3, max_tiles], PagedLoRAMeta.tiles
    num_tiles: int,  # grid size, PagedLoRAMeta.num_tiles(T): a bound from T, not the step's tiles
    tile_tokens: int,  # PagedLoRAMeta.tile_tokens
    y: torch.Tensor,  # [T, sum(out_sizes)], unit column stride; updated in place
    out_sizes: Sequence[int],
) -> None:
    """Segment (prefill) form."""
    num_slices, num_tokens, max_rank = buf.shape
    config = get_launch_config(
        "expand_segment", num_tokens=num_tokens, num_slices=num_slices, max_rank=max_rank, features=max(out_sizes),
        device=y.device,
    )  # fmt: skip
    grid = (num_tiles, num_slices, triton.cdiv(max(out_sizes), config["BLOCK_N"]))
    jitted(_expand_segment_kernel)[grid](
        buf, pool, b_row_offsets, ranks, scalings, token_order, tiles, y,
        *_slice_widths(out_sizes),
        buf.stride(0), buf.stride(1), b_row_offsets.stride(0), b_row_offsets.stride(1),
        ranks.stride(0), scalings.stride(0), tiles.stride(0), y.stride(0),
        BLOCK_M=tile_tokens, DOT_IN_FP32=dot_in_fp32(pool.dtype), **config,
    )  # fmt: skip
