"""Paged LoRA shrink in Triton: out[s, t, :rank] = x[t] @ A_s(adapter(t))^T.

Weights are read straight from pool pages: row j of A_s(a) is ``in_features``
contiguous elements at ``pool + a_row_offsets[a, s, j]`` (kernels/page_layout.py), so a
tile of rows is one gather of row starts plus contiguous loads along K. Ranks differ
per adapter and slice; rows at or past the rank are masked, never read, and a rank tile
entirely past the rank exits early, so a rank-8 adapter costs rank-8 work in a batch
with rank-128 ones. Accumulation is fp32.

Two forms (after S-LoRA's MBGMV/MBGMM and Punica's BGMV/SGMV):

* per-token (decode): one program per (token, slice, rank tile[, K split]); a GEMV on
  CUDA cores, each token streams its adapter's rows (tokens sharing an adapter hit L2).
* segment (prefill): tokens grouped by adapter (PagedLoRAMeta tiles); one program per
  (tile of <= BLOCK_M tokens of one adapter, slice, rank tile) runs ``tl.dot``, so each
  weight row is read once per tile instead of once per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_jit import dot_in_fp32, jitted
from .triton_config import get_launch_config


def _shrink_token_kernel(
    x_ptr,
    pool_ptr,
    row_offsets_ptr,
    ranks_ptr,
    token_adapter_ptr,
    out_ptr,
    in_features,
    max_rank,
    x_stride_t,
    offsets_stride_a,
    offsets_stride_s,
    ranks_stride_a,
    out_stride_s,
    out_stride_t,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slice_id = tl.program_id(1)
    rank_tile = tl.program_id(2) // SPLIT_K
    k_split = tl.program_id(2) % SPLIT_K
    rows = rank_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    out_ptrs = out_ptr + slice_id * out_stride_s + token * out_stride_t + rows
    adapter = tl.load(token_adapter_ptr + token)
    # Early exit for a token without adapter: its output rows are zero.
    if adapter < 0:
        if SPLIT_K == 1:  # with K split the launcher zeroed `out`
            tl.store(out_ptrs, tl.zeros((BLOCK_R,), dtype=tl.float32), mask=rows < max_rank)
        return
    rank = tl.load(ranks_ptr + adapter * ranks_stride_a + slice_id)
    row_mask = rows < rank
    starts = tl.load(
        row_offsets_ptr + adapter * offsets_stride_a + slice_id * offsets_stride_s + rows, mask=row_mask, other=0
    )
    # 2-D partial sums, reduced once at the end (cheaper than a reduction per K step).
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    if rank_tile * BLOCK_R < rank:
        k_chunk = tl.cdiv(in_features, SPLIT_K * BLOCK_K) * BLOCK_K
        k_begin = k_split * k_chunk
        k_end = tl.minimum(k_begin + k_chunk, in_features)
        for k0 in range(k_begin, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < k_end
            xv = tl.load(x_ptr + token * x_stride_t + ks, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(pool_ptr + starts[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            acc += w.to(tl.float32) * xv[None, :]
    result = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        tl.store(out_ptrs, result, mask=rows < max_rank)
    else:
        tl.atomic_add(out_ptrs, result, mask=row_mask)


def _shrink_segment_kernel(
    x_ptr,
    pool_ptr,
    row_offsets_ptr,
    ranks_ptr,
    token_order_ptr,
    tiles_ptr,
    out_ptr,
    in_features,
    x_stride_t,
    offsets_stride_a,
    offsets_stride_s,
    ranks_stride_a,
    tiles_stride,
    out_stride_s,
    out_stride_t,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    tile = tl.program_id(0)
    slice_id = tl.program_id(1)
    rank_tile = tl.program_id(2)
    adapter = tl.load(tiles_ptr + tile)
    # Early exit for tiles past the batch's last one (the grid is an upper bound).
    if adapter < 0:
        return
    rank = tl.load(ranks_ptr + adapter * ranks_stride_a + slice_id)
    if rank_tile * BLOCK_R >= rank:  # `out` is pre-zeroed; nothing to do past the rank
        return
    first = tl.load(tiles_ptr + tiles_stride + tile)
    length = tl.load(tiles_ptr + 2 * tiles_stride + tile)
    m = tl.arange(0, BLOCK_M)
    m_mask = m < length
    tokens = tl.load(token_order_ptr + first + m, mask=m_mask, other=0).to(tl.int64)
    rows = rank_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < rank
    starts = tl.load(
        row_offsets_ptr + adapter * offsets_stride_a + slice_id * offsets_stride_s + rows, mask=row_mask, other=0
    )
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < in_features
        x_ptrs = x_ptr + tokens[:, None] * x_stride_t + ks[None, :]
        xs = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # [BLOCK_K, BLOCK_R]: column j is A row j, read contiguously along K.
        w = tl.load(pool_ptr + starts[None, :] + ks[:, None], mask=k_mask[:, None] & row_mask[None, :], other=0.0)
        if DOT_IN_FP32:  # see dot_in_fp32()
            acc += tl.dot(xs.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xs, w)
    out_ptrs = out_ptr + slice_id * out_stride_s + tokens[:, None] * out_stride_t + rows[None, :]
    tl.store(out_ptrs, acc, mask=m_mask[:, None] & row_mask[None, :])


# Launch decisions (below and in kernels/triton_config.py) depend only on static
# quantities: the batch's token count T (fixed per captured CUDA graph), the tables'
# n_slices and width R (out.shape), in_features, the meta's tile_tokens and max tile
# count for T, and the device's SM count. Never on token_adapter, ranks, the number of
# adapters in the step or any other device value: split_k (and so whether `out` is
# zeroed first), the grid and the constexprs of a graph captured without adapters are
# exactly those of every later step, and nothing here synchronizes with the host.


def shrink_token(
    x: torch.Tensor,  # [T, in_features], row stride free, unit column stride
    pool: torch.Tensor,  # [N] flat, x.dtype
    a_row_offsets: torch.Tensor,  # int64 [A, n_slices, R], contiguous
    ranks: torch.Tensor,  # int32 [A, n_slices], contiguous
    token_adapter: torch.Tensor,  # int32 [T]
    out: torch.Tensor,  # float32 [n_slices, T, R], unit last stride; overwritten
) -> None:
    """Per-token (decode) form; writes every element of ``out``."""
    num_slices, num_tokens, max_rank = out.shape
    in_features = x.shape[1]
    config = get_launch_config(
        "shrink_token", num_tokens=num_tokens, num_slices=num_slices, max_rank=max_rank, features=in_features,
        device=x.device,
    )  # fmt: skip
    # Small batches split K to fill the GPU; partial sums meet through fp32 atomics, so
    # `out` must start at zero.
    if config["SPLIT_K"] > 1:
        out.zero_()
    grid = (num_tokens, num_slices, triton.cdiv(max_rank, config["BLOCK_R"]) * config["SPLIT_K"])
    jitted(_shrink_token_kernel)[grid](
        x, pool, a_row_offsets, ranks, token_adapter, out,
        in_features, max_rank,
        x.stride(0), a_row_offsets.stride(0), a_row_offsets.stride(1), ranks.stride(0),
        out.stride(0), out.stride(1),
        **config,
    )  # fmt: skip


def shrink_segment(
    x: torch.Tensor,  # [T, in_features], unit column stride
    pool: torch.Tensor,  # [N] flat, x.dtype
    a_row_offsets: torch.Tensor,  # int64 [A, n_slices, R], contiguous
    ranks: torch.Tensor,  # int32 [A, n_slices], contiguous
    token_order: torch.Tensor,  # int64 [>= T], PagedLoRAMeta.token_order
    tiles: torch.Tensor,  # int32 [3, max_tiles], PagedLoRAMeta.tiles
    num_tiles: int,  # grid size, PagedLoRAMeta.num_tiles(T): a bound from T, not the step's tiles
    tile_tokens: int,  # PagedLoRAMeta.tile_tokens
    out: torch.Tensor,  # float32 [n_slices, T, R], unit last stride; overwritten
) -> None:
    """Segment (prefill) form: tokens grouped by adapter, ``tl.dot`` per tile."""
    out.zero_()  # tokens without adapter and rows past each rank stay zero
    num_slices, _, max_rank = out.shape
    in_features = x.shape[1]
    config = get_launch_config(
        "shrink_segment", num_tokens=x.shape[0], num_slices=num_slices, max_rank=max_rank, features=in_features,
        device=x.device,
    )  # fmt: skip
    grid = (num_tiles, num_slices, triton.cdiv(max_rank, config["BLOCK_R"]))
    jitted(_shrink_segment_kernel)[grid](
        x, pool, a_row_offsets, ranks, token_order, tiles, out,
        in_features,
        x.stride(0), a_row_offsets.stride(0), a_row_offsets.stride(1), ranks.stride(0), tiles.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_M=tile_tokens, DOT_IN_FP32=dot_in_fp32(x.dtype), **config,
    )  # fmt: skip
