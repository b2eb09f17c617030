"""Paged LoRA shrink/expand in plain torch: the CPU backend and the semantic reference.

Semantics (``a = token_adapter[t]``, ``r = ranks[a, s]``, rows read from ``pool``)::

    shrink: out[s, t, :r] = x[t] @ A_s(a)^T            A_s row j = pool[a_row_offsets[a, s, j] :][:in]
            out[s, t, r:] = 0, and out[:, t] = 0 when a == -1
    expand: y[t, slice s] += scalings[a, s] * buf[s, t, :r] @ B_s(a)^T
                                                      B_s^T row j = pool[b_row_offsets[a, s, j] :][:out_s]
            rows of tokens with a == -1 and slices with r == 0 are not written at all

Speed on CPU comes from doing the work per adapter, not per token: tokens are grouped by
adapter (a zero-copy slice when an adapter's tokens are consecutive, as in prefill), and
weights are never gathered: consecutive rows that sit back to back in the pool (a *run*;
rows of one matrix are back to back inside a page) are one zero-copy 2-D view of the
pool, so each (adapter, slice) costs one matmul per run, typically 1-2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenGroup:
    adapter: int
    tokens: slice | torch.Tensor  # a slice when the tokens are consecutive, else int64 indices


def group_tokens(
    token_adapter: torch.Tensor,  # int32 [T]
    num_adapters: int,
    token_order: torch.Tensor | None = None,  # int64 [>= T], from PagedLoRAMeta
    adapter_starts: torch.Tensor | None = None,  # int64 [>= num_adapters + 1]
) -> list[TokenGroup]:
    """The tokens of every adapter that has some, in adapter order (host sync: CPU path)."""
    num_tokens = token_adapter.shape[0]
    if num_tokens == 0:
        return []
    if token_order is None or adapter_starts is None:
        key = token_adapter.to(torch.int64).masked_fill(token_adapter < 0, num_adapters)
        token_order = torch.sort(key, stable=True).indices
        counts = torch.bincount(key, minlength=num_adapters + 1)
        adapter_starts = torch.zeros(num_adapters + 2, dtype=torch.int64, device=key.device)
        torch.cumsum(counts, 0, out=adapter_starts[1:])
    starts = adapter_starts[: num_adapters + 1]
    bounds = starts.tolist()
    # First and last token of each group: a group is consecutive iff last - first == count - 1
    # (the sort is stable, so a group's tokens are increasing).
    first = token_order[starts[:-1].clamp(max=num_tokens - 1)].tolist()
    last = token_order[(starts[1:] - 1).clamp(min=0)].tolist()
    groups = []
    for a in range(num_adapters):
        begin, end = bounds[a], bounds[a + 1]
        if end == begin:
            continue
        if last[a] - first[a] == end - begin - 1:
            groups.append(TokenGroup(a, slice(first[a], last[a] + 1)))
        else:
            groups.append(TokenGroup(a, token_order[begin:end]))
    return groups


def row_runs(
    row_offsets: torch.Tensor,  # int64 [A, n_slices, R]
    ranks: torch.Tensor,  # int32 [A, n_slices]
    row_len: int | Sequence[int],  # elements per row, per slice if a sequence
) -> dict[tuple[int, int], list[tuple[int, int, int]]]:
    """Maximal runs of back-to-back rows: {(a, s): [(first row, end row, pool offset)]}.

    A matrix whose rows are all back to back (`rows_are_contiguous`) is a single run.
    """
    num_adapters, num_slices, width = row_offsets.shape
    device = row_offsets.device
    lens = torch.as_tensor([row_len] * num_slices if isinstance(row_len, int) else list(row_len), device=device)
    j = torch.arange(width, device=device)
    used = j < ranks.to(torch.int64)[..., None]
    starts_run = torch.ones_like(used)
    if width > 1:
        starts_run[..., 1:] = row_offsets[..., 1:] != row_offsets[..., :-1] + lens[None, :, None]
    a_idx, s_idx, j_idx = torch.nonzero(starts_run & used, as_tuple=True)
    offsets = row_offsets[a_idx, s_idx, j_idx].tolist()
    rank_list = ranks.tolist()
    runs: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for a, s, j0, off in zip(a_idx.tolist(), s_idx.tolist(), j_idx.tolist(), offsets):
        found = runs.setdefault((a, s), [])
        if found:  # close the previous run of this matrix where this one starts
            prev_j, _, prev_off = found[-1]
            found[-1] = (prev_j, j0, prev_off)
        found.append((j0, rank_list[a][s], off))
    return runs


def rows_are_contiguous(
    row_offsets: torch.Tensor,  # int64 [..., R]
    ranks: torch.Tensor,  # int32 [...]
    row_len: int,
) -> torch.Tensor:
    """bool [...]: the first ``rank`` rows are back to back (offset[j] = offset[0] + j*row_len).

    Cheap (one vectorized compare); such a matrix is one zero-copy view of the pool.
    """
    j = torch.arange(row_offsets.shape[-1], device=row_offsets.device)
    expected = row_offsets[..., :1] + j * row_len
    return ((row_offsets == expected) | (j >= ranks[..., None])).all(-1)


def _run_view(pool: torch.Tensor, offset: int, rows: int, row_len: int) -> torch.Tensor:
    """[rows, row_len] zero-copy view of ``rows`` back-to-back rows starting at ``offset``.

    as_strided's offset counts from the start of the *storage*, and a layer's pool may be
    a view into storage shared with other layers, so the view's own offset is added.
    """
    return pool.as_strided((rows, row_len), (row_len, 1), pool.storage_offset() + offset)


def _compute(t: torch.Tensor) -> torch.Tensor:
    # fp32 accumulation whatever the storage dtype (a no-op for fp32, the CPU default).
    return t if t.dtype == torch.float32 else t.float()


def _pick(x: torch.Tensor, tokens: slice | torch.Tensor) -> torch.Tensor:
    return x[tokens] if isinstance(tokens, slice) else x.index_select(0, tokens)


@dataclass(frozen=True)
class TokenPlan:
    """The step's tokens with an adapter, as one contiguous span per adapter.

    When every adapter's tokens are already consecutive (prefill) ``order`` is None and
    spans index the batch itself. Otherwise ``order`` (int64 [n]) lists the adapted
    tokens sorted by adapter and spans index that sorted copy: gathering ``x`` once and
    scattering the result once beats one index op per adapter by far when many adapters
    each own a few interleaved decode tokens.
    """

    order: torch.Tensor | None
    spans: tuple[tuple[int, int, int], ...]  # (adapter row, begin, end)


def plan_tokens(
    token_adapter: torch.Tensor,  # int32 [T]
    num_adapters: int,
    token_order: torch.Tensor | None = None,  # int64 [>= T], from PagedLoRAMeta
    adapter_starts: torch.Tensor | None = None,  # int64 [>= num_adapters + 1]
) -> TokenPlan:
    """Group the tokens by adapter once (host sync: CPU path); see `TokenPlan`."""
    groups = group_tokens(token_adapter, num_adapters, token_order, adapter_starts)
    if all(isinstance(g.tokens, slice) for g in groups):
        return TokenPlan(None, tuple((g.adapter, g.tokens.start, g.tokens.stop) for g in groups))
    spans, order, begin = [], [], 0
    for g in groups:
        tokens = g.tokens if isinstance(g.tokens, torch.Tensor) else torch.arange(
            g.tokens.start, g.tokens.stop, device=token_adapter.device)
        spans.append((g.adapter, begin, begin + tokens.numel()))
        order.append(tokens)
        begin += tokens.numel()
    return TokenPlan(torch.cat(order), tuple(spans))


RowRuns = dict  # {(adapter, slice): [(first row, end row, pool offset)]}, from row_runs


class PreparedRuns(dict):
    """{adapter: [(slice, first row, end row, weight)]}: row runs with their pool views.

    ``weight`` is the run's zero-copy [rows, row_len] view of the pool (transposed for
    the shrink), already in the compute dtype. Building views costs more than a tiny
    decode matmul, so callers whose tables stay valid across many calls (vllm_slora's
    per-step tables, reused by every layer) prepare them once with `prepare_runs`.
    """


def prepare_runs(
    pool: torch.Tensor,  # [N] flat
    runs: RowRuns,  # from row_runs
    row_len: int | Sequence[int],  # elements per row, per slice if a sequence
    transpose: bool,  # True for A (shrink multiplies by A^T)
) -> PreparedRuns:
    prepared = PreparedRuns()
    for (a, s), found in sorted(runs.items()):
        length = row_len if isinstance(row_len, int) else row_len[s]
        for j0, j1, offset in found:
            weight = _compute(_run_view(pool, offset, j1 - j0, length))
            prepared.setdefault(a, []).append((s, j0, j1, weight.t() if transpose else weight))
    return prepared


def shrink_torch(
    x: torch.Tensor,  # [T, in_features]
    pool: torch.Tensor,  # [N] flat, x.dtype
    a_row_offsets: torch.Tensor,  # int64 [A, n_slices, R]
    ranks: torch.Tensor,  # int32 [A, n_slices]
    token_adapter: torch.Tensor,  # int32 [T]
    out: torch.Tensor,  # float32 [n_slices, T, R], overwritten
    token_order: torch.Tensor | None = None,
    adapter_starts: torch.Tensor | None = None,
    plan: TokenPlan | None = None,  # precomputed for this step (else derived here)
    runs: RowRuns | PreparedRuns | None = None,  # row_runs(a_row_offsets, ranks, in_features)
) -> None:
    """out[s, t, :r] = x[t] @ A_s(a)^T, zero elsewhere (see module docstring)."""
    out.zero_()
    num_adapters, num_slices, _ = a_row_offsets.shape
    if plan is None:
        plan = plan_tokens(token_adapter, num_adapters, token_order, adapter_starts)
    if not plan.spans:
        return
    in_features = x.shape[1]
    if not isinstance(runs, PreparedRuns):
        runs = prepare_runs(pool, runs if runs is not None else row_runs(a_row_offsets, ranks, in_features),
                            in_features, transpose=True)
    if plan.order is None:
        xs, dst = x, out
    else:
        xs = x.index_select(0, plan.order)  # [n, in], adapter-sorted
        dst = torch.zeros(num_slices, plan.order.numel(), out.shape[2], dtype=out.dtype, device=out.device)
    for adapter, begin, end in plan.spans:
        xa = _compute(xs[begin:end])  # [Ta, in]
        rows = dst[:, begin:end]  # [n_slices, Ta, R]
        for s, j0, j1, weight_t in runs.get(adapter, ()):
            torch.mm(xa, weight_t, out=rows[s, :, j0:j1])
    if plan.order is not None:
        out.index_copy_(1, plan.order, dst)


def expand_torch(
    buf: torch.Tensor,  # float32 [n_slices, T, R]
    pool: torch.Tensor,  # [N] flat, y.dtype
    b_row_offsets: torch.Tensor,  # int64 [A, n_slices, R]
    ranks: torch.Tensor,  # int32 [A, n_slices]
    scalings: torch.Tensor,  # float32 [A, n_slices]
    token_adapter: torch.Tensor,  # int32 [T]
    y: torch.Tensor,  # [T, sum(out_sizes)], updated in place
    out_sizes: Sequence[int],
    token_order: torch.Tensor | None = None,
    adapter_starts: torch.Tensor | None = None,
    plan: TokenPlan | None = None,  # precomputed for this step (else derived here)
    runs: RowRuns | PreparedRuns | None = None,  # row_runs(b_row_offsets, ranks, out_sizes)
) -> None:
    """y[t, slice s] += scalings[a, s] * buf[s, t, :r] @ B_s(a)^T (see module docstring)."""
    num_adapters, num_slices, _ = b_row_offsets.shape
    if plan is None:
        plan = plan_tokens(token_adapter, num_adapters, token_order, adapter_starts)
    if not plan.spans:
        return
    if not isinstance(runs, PreparedRuns):
        runs = prepare_runs(pool, runs if runs is not None else row_runs(b_row_offsets, ranks, out_sizes),
                            out_sizes, transpose=False)
    scale = scalings.tolist()
    slice_starts = [sum(out_sizes[:s]) for s in range(num_slices)]
    sorted_buf = buf if plan.order is None else buf.index_select(1, plan.order)  # [n_slices, n, R]
    # Consecutive tokens in fp32 (the CPU prefill case) go straight into y's rows, one fused
    # op per run. Otherwise the delta accumulates in fp32, in adapter-sorted order, and is
    # added to y once (rounding once into y's dtype), only for tokens with an adapter.
    direct = plan.order is None and y.dtype == torch.float32
    target = y if direct else torch.zeros(sorted_buf.shape[1], y.shape[1], dtype=torch.float32, device=y.device)
    for adapter, begin, end in plan.spans:
        rows = target[begin:end]
        for s, j0, j1, weight in runs.get(adapter, ()):
            start = slice_starts[s]
            rows[:, start : start + out_sizes[s]].addmm_(sorted_buf[s, begin:end, j0:j1], weight,
                                                         alpha=scale[adapter][s])
    if direct:
        return
    if plan.order is None:
        for _, begin, end in plan.spans:
            y[begin:end].add_(target[begin:end])
    else:
        y.index_add_(0, plan.order, target.to(y.dtype))
