"""The paged LoRA ops as torch custom ops (``torch.ops.slora.*``), and their Python API.

Semantics (``a = token_adapter[t]``, -1 = no adapter; ``r = ranks[a, s]``, 0 = slice absent)::

    paged_lora_shrink: out[s, t, :r] = x[t] @ A_s(a)^T ; every other element of out = 0
    paged_lora_expand: y[t, slice s] += scalings[a, s] * buf[s, t, :r] @ B_s(a)^T
                       (tokens with a == -1 and slices with r == 0: y untouched, bit-exact)

where row j of A_s(a) / B_s(a)^T is read from ``pool[row_offsets[a, s, j]:]``
(kernels/page_layout.py). Backends: Triton on CUDA (per-token form, or the segment form
when a `PagedLoRAMeta` is passed and the batch has >= ``meta.segment_min_tokens``
tokens), kernels/torch_ops.py on CPU or without Triton.

The ops are opaque to torch.compile (fake impls give it the shapes). On CUDA with
Triton they never read a device value on the host, and every launch decision (form,
grid, block sizes, split-K: kernels/triton_config.py) depends only on static bounds:
the batch's token count T, the tables' A (= S_max), n_slices and R, the feature sizes,
the meta's tile_tokens and segment_min_tokens, and the device. So a CUDA graph captured
in a step where no token has an adapter replays correctly for every later step, as long
as the per-step state is rewritten in place, outside the graph, before each replay: the
token->slot map (int32 [max_tokens], passed as its first T entries; entries past the
step's tokens are -1), the row tables (kernels/slot_tables.py) and the meta, prepared
over all max_tokens entries of that map. The torch path (CPU, or CUDA without Triton)
groups tokens on the host and is not capture-safe.

This module can be imported twice in one process (as ``kernels.ops`` and as
``vllm_slora.kernels.ops``); the second import finds the ops registered and reuses them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import torch_ops
from .metadata import PagedLoRAMeta, max_tiles

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the torch path serves every call
    HAS_TRITON = False

NAMESPACE = "slora"
_SHRINK_SCHEMA = (
    "paged_lora_shrink(Tensor x, Tensor pool, Tensor a_row_offsets, Tensor ranks, Tensor token_adapter, "
    "Tensor(a!) out, Tensor? token_order=None, Tensor? adapter_starts=None, Tensor? tiles=None, "
    "int tile_tokens=0) -> ()"
)
_EXPAND_SCHEMA = (
    "paged_lora_expand(Tensor buf, Tensor pool, Tensor b_row_offsets, Tensor ranks, Tensor scalings, "
    "Tensor token_adapter, Tensor(a!) y, int[] out_sizes, Tensor? token_order=None, "
    "Tensor? adapter_starts=None, Tensor? tiles=None, int tile_tokens=0) -> ()"
)


def _check_tables(row_offsets: torch.Tensor, ranks: torch.Tensor, token_adapter: torch.Tensor, tokens: int) -> None:
    assert row_offsets.dtype == torch.int64 and row_offsets.dim() == 3, (
        f"row offsets must be int64 [A, n_slices, R], got {row_offsets.dtype} {tuple(row_offsets.shape)}"
    )
    assert row_offsets.is_contiguous(), "row offsets must be contiguous"
    assert ranks.dtype == torch.int32 and tuple(ranks.shape) == tuple(row_offsets.shape[:2]), (
        f"ranks must be int32 [A, n_slices] = {tuple(row_offsets.shape[:2])}, got {ranks.dtype} {tuple(ranks.shape)}"
    )
    assert ranks.is_contiguous(), "ranks must be contiguous"
    assert token_adapter.dtype == torch.int32 and tuple(token_adapter.shape) == (tokens,), (
        f"token_adapter must be int32 [T={tokens}], got {token_adapter.dtype} {tuple(token_adapter.shape)}"
    )


def _check_pool(pool: torch.Tensor, dtype: torch.dtype) -> None:
    assert pool.dim() == 1 and pool.stride(0) == 1, f"pool must be a flat contiguous view, got {tuple(pool.shape)}"
    assert pool.dtype == dtype, f"pool dtype {pool.dtype} must match the activations' {dtype}"


def _check_segments(token_order, adapter_starts, tiles, tile_tokens: int) -> None:
    if tiles is not None:
        assert token_order is not None, "tiles need token_order"
        assert tiles.dtype == torch.int32 and tiles.dim() == 2 and tiles.shape[0] == 3, "tiles must be int32 [3, n]"
        assert tile_tokens >= 16, "tile_tokens must be given with tiles"
    if adapter_starts is not None:
        assert token_order is not None, "adapter_starts need token_order"


def _use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda


def _shrink_impl(
    x: torch.Tensor,  # [T, in_features]
    pool: torch.Tensor,  # [N] flat, x.dtype
    a_row_offsets: torch.Tensor,  # int64 [A, n_slices, R]
    ranks: torch.Tensor,  # int32 [A, n_slices]
    token_adapter: torch.Tensor,  # int32 [T]
    out: torch.Tensor,  # float32 [n_slices, T, R]
    token_order: torch.Tensor | None = None,  # int64 [>= T]
    adapter_starts: torch.Tensor | None = None,  # int64 [>= A + 1]
    tiles: torch.Tensor | None = None,  # int32 [3, >= num tiles]
    tile_tokens: int = 0,
) -> None:
    num_tokens = x.shape[0]
    assert x.dim() == 2 and x.stride(1) == 1, f"x must be [T, in] with unit column stride, got {tuple(x.shape)}"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {x.dtype}"
    _check_pool(pool, x.dtype)
    _check_tables(a_row_offsets, ranks, token_adapter, num_tokens)
    _check_segments(token_order, adapter_starts, tiles, tile_tokens)
    _, num_slices, width = a_row_offsets.shape
    assert out.dtype == torch.float32 and tuple(out.shape) == (num_slices, num_tokens, width), (
        f"out must be float32 [n_slices, T, R] = {(num_slices, num_tokens, width)}, got {out.dtype} {tuple(out.shape)}"
    )
    assert out.stride(2) == 1, "out must have a unit last stride"
    if num_tokens == 0:
        return
    if not _use_triton(x):
        torch_ops.shrink_torch(x, pool, a_row_offsets, ranks, token_adapter, out, token_order, adapter_starts)
    elif tiles is not None:
        from .triton_shrink import shrink_segment

        num_tiles = max_tiles(num_tokens, a_row_offsets.shape[0], tile_tokens)
        shrink_segment(x, pool, a_row_offsets, ranks, token_order, tiles, num_tiles, tile_tokens, out)
    else:
        from .triton_shrink import shrink_token

        shrink_token(x, pool, a_row_offsets, ranks, token_adapter, out)


def _expand_impl(
    buf: torch.Tensor,  # float32 [n_slices, T, R]
    pool: torch.Tensor,  # [N] flat, y.dtype
    b_row_offsets: torch.Tensor,  # int64 [A, n_slices, R]
    ranks: torch.Tensor,  # int32 [A, n_slices]
    scalings: torch.Tensor,  # float32 [A, n_slices]
    token_adapter: torch.Tensor,  # int32 [T]
    y: torch.Tensor,  # [T, sum(out_sizes)]
    out_sizes: Sequence[int],
    token_order: torch.Tensor | None = None,  # int64 [>= T]
    adapter_starts: torch.Tensor | None = None,  # int64 [>= A + 1]
    tiles: torch.Tensor | None = None,  # int32 [3, >= num tiles]
    tile_tokens: int = 0,
) -> None:
    num_tokens = y.shape[0]
    assert y.dim() == 2 and y.stride(1) == 1, f"y must be [T, out] with unit column stride, got {tuple(y.shape)}"
    _check_pool(pool, y.dtype)
    _check_tables(b_row_offsets, ranks, token_adapter, num_tokens)
    _check_segments(token_order, adapter_starts, tiles, tile_tokens)
    num_slices = b_row_offsets.shape[1]
    assert len(out_sizes) == num_slices and sum(out_sizes) == y.shape[1], (
        f"out_sizes {list(out_sizes)} must give {num_slices} slices summing to y's width {y.shape[1]}"
    )
    assert buf.dtype == torch.float32 and buf.dim() == 3 and tuple(buf.shape[:2]) == (num_slices, num_tokens), (
        f"buf must be float32 [n_slices={num_slices}, T={num_tokens}, R], got {buf.dtype} {tuple(buf.shape)}"
    )
    assert buf.shape[2] >= b_row_offsets.shape[2] and buf.stride(2) == 1, "buf must cover R with unit last stride"
    assert scalings.dtype == torch.float32 and scalings.shape == ranks.shape and scalings.is_contiguous(), (
        f"scalings must be contiguous float32 [A, n_slices], got {scalings.dtype} {tuple(scalings.shape)}"
    )
    if num_tokens == 0:
        return
    if not _use_triton(y):
        torch_ops.expand_torch(
            buf, pool, b_row_offsets, ranks, scalings, token_adapter, y, out_sizes, token_order, adapter_starts
        )
    elif tiles is not None:
        from .triton_expand import expand_segment

        num_tiles = max_tiles(num_tokens, b_row_offsets.shape[0], tile_tokens)
        expand_segment(
            buf, pool, b_row_offsets, ranks, scalings, token_order, tiles, num_tiles, tile_tokens, y, out_sizes
        )
    else:
        from .triton_expand import expand_token

        expand_token(buf, pool, b_row_offsets, ranks, scalings, token_adapter, y, out_sizes)


def _shrink_fake(x, pool, a_row_offsets, ranks, token_adapter, out, token_order=None, adapter_starts=None,
                 tiles=None, tile_tokens=0) -> None:  # fmt: skip
    return None


def _expand_fake(buf, pool, b_row_offsets, ranks, scalings, token_adapter, y, out_sizes, token_order=None,
                 adapter_starts=None, tiles=None, tile_tokens=0) -> None:  # fmt: skip
    return None


def _registered(name: str) -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), name)


_LIBRARY: torch.library.Library | None = None  # owns the ops this module registered


def _register_ops() -> None:
    """Define slora::paged_lora_{shrink,expand} unless an earlier import already did."""
    global _LIBRARY
    if _registered("paged_lora_shrink") and _registered("paged_lora_expand"):
        return
    _LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
    ops = ((_SHRINK_SCHEMA, _shrink_impl, _shrink_fake), (_EXPAND_SCHEMA, _expand_impl, _expand_fake))
    for schema, impl, fake in ops:
        name = schema.split("(", 1)[0]
        _LIBRARY.define(schema)
        for key in ("CPU", "CUDA"):
            _LIBRARY.impl(name, impl, key)
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIBRARY)


_register_ops()


def _segment_args(meta: PagedLoRAMeta | None, num_tokens: int, on_cuda: bool) -> dict:
    """The meta's tensors for the op: grouping for the CPU path, tiles for Triton's segment form."""
    if meta is None:
        return {}
    # A meta prepared over a longer map (the worker prepares all max_tokens entries, whose
    # tail is -1) groups the first num_tokens tokens exactly as one prepared for them.
    assert meta.num_tokens >= num_tokens, (
        f"meta was prepared for {meta.num_tokens} tokens, the op got {num_tokens}; call meta.prepare(token_adapter)"
    )
    args = {"token_order": meta.token_order, "adapter_starts": meta.adapter_starts}
    if on_cuda and num_tokens >= meta.segment_min_tokens:
        args.update(tiles=meta.tiles, tile_tokens=meta.tile_tokens)
    return args


def paged_lora_shrink(
    x: torch.Tensor,  # [T, in_features], any float dtype; unit column stride
    pool: torch.Tensor,  # [N] flat view of the layer's KV tensor, x.dtype
    a_row_offsets: torch.Tensor,  # int64 [A, n_slices, R]: pool offset of row j of A_s(a)
    ranks: torch.Tensor,  # int32 [A, n_slices]: rank of A_s(a), 0 = slice absent
    token_adapter: torch.Tensor,  # int32 [T]: adapter row per token, -1 = none
    out: torch.Tensor,  # float32 [n_slices, T, R]: overwritten
    meta: PagedLoRAMeta | None = None,  # prepared with this token_adapter, or None
) -> None:
    """Semantics: out[s, t, :r] = x[t] @ A_s(a)^T, zero elsewhere (module docstring)."""
    args = _segment_args(meta, x.shape[0], x.is_cuda)
    torch.ops.slora.paged_lora_shrink(x, pool, a_row_offsets, ranks, token_adapter, out, **args)


def paged_lora_expand(
    buf: torch.Tensor,  # float32 [n_slices, T, R]: the shrink output
    pool: torch.Tensor,  # [N] flat view of the layer's KV tensor, y.dtype
    b_row_offsets: torch.Tensor,  # int64 [A, n_slices, R]: pool offset of row j of B_s(a)^T
    ranks: torch.Tensor,  # int32 [A, n_slices]: rank of B_s(a), 0 = slice absent
    scalings: torch.Tensor,  # float32 [A, n_slices]
    token_adapter: torch.Tensor,  # int32 [T]: adapter row per token, -1 = none
    y: torch.Tensor,  # [T, sum(out_sizes)]: slices side by side; updated in place
    out_sizes: Sequence[int],  # width of every slice in y
    meta: PagedLoRAMeta | None = None,  # prepared with this token_adapter, or None
) -> None:
    """Semantics: y[t, slice s] += scalings[a, s] * buf[s, t, :r] @ B_s(a)^T (module docstring)."""
    args = _segment_args(meta, y.shape[0], y.is_cuda)
    torch.ops.slora.paged_lora_expand(
        buf, pool, b_row_offsets, ranks, scalings, token_adapter, y, list(out_sizes), **args
    )


def paged_lora_linear(
    y: torch.Tensor,  # [T, sum(out_sizes)]: base layer output; updated in place
    x: torch.Tensor,  # [T, in_features]: the layer input
    pool: torch.Tensor,  # [N] flat, x.dtype
    a_row_offsets: torch.Tensor,  # int64 [A, n_slices, R]
    b_row_offsets: torch.Tensor,  # int64 [A, n_slices, R]
    ranks: torch.Tensor,  # int32 [A, n_slices]: A ranks (and B ranks unless b_ranks given)
    scalings: torch.Tensor,  # float32 [A, n_slices]
    token_adapter: torch.Tensor,  # int32 [T]
    out_sizes: Sequence[int],
    meta: PagedLoRAMeta | None = None,
    buf: torch.Tensor | None = None,  # float32 [n_slices, >= T, R] scratch, allocated if None
    b_ranks: torch.Tensor | None = None,  # int32 [A, n_slices] when B's rank differs (TP shards)
) -> None:
    """Semantics: y[t, slice s] += scalings[a, s] * x[t] @ A_s(a)^T @ B_s(a)^T; shrink then expand."""
    num_slices, width = a_row_offsets.shape[1], a_row_offsets.shape[2]
    num_tokens = x.shape[0]
    if buf is None:
        buf = torch.empty(num_slices, num_tokens, width, dtype=torch.float32, device=x.device)
    else:
        buf = buf[:, :num_tokens]
    paged_lora_shrink(x, pool, a_row_offsets, ranks, token_adapter, buf, meta)
    paged_lora_expand(
        buf, pool, b_row_offsets, ranks if b_ranks is None else b_ranks, scalings, token_adapter, y, out_sizes, meta
    )
