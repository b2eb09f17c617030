"""Test data for the paged LoRA ops: dense adapters packed into a pool, plus the oracle.

The oracle computes from the ORIGINAL dense A/B matrices (before packing), so it shares
no code with the ops under test; only the packing helper sits between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels import PagedLoRAMeta, build_row_tables, pack_lora_layer
from kernels.packing import lora_layer_layout

POPULARITIES = ["distinct", "uniform", "zipf", "identical", "skewed"]
TOLERANCES = {  # (atol, rtol) on outputs of magnitude ~1
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 5e-2),
}


def adapter_counts(popularity: str, num_tokens: int) -> list[int]:
    """Tokens per adapter for a batch of ``num_tokens`` (Punica's workload names)."""
    if popularity == "distinct":
        return [1] * num_tokens
    if popularity == "identical":
        return [num_tokens]
    if popularity == "uniform":
        n = math.ceil(math.sqrt(num_tokens))
        return [len(range(i, num_tokens, n)) for i in range(n)]
    if popularity == "zipf":  # geometric segment sizes 1, 1.5, 2.25, ...
        counts, size = [], 1.0
        while sum(counts) < num_tokens:
            counts.append(min(int(size), num_tokens - sum(counts)))
            size *= 1.5
        return counts
    if popularity == "skewed":  # one hot adapter, a long tail of single tokens
        hot = max(1, num_tokens - num_tokens // 4)
        return [hot] + [1] * (num_tokens - hot)
    raise ValueError(popularity)


@dataclass
class LoRACase:
    x: torch.Tensor  # [T, in]
    y0: torch.Tensor  # [T, sum(out_sizes)] base output
    pool: torch.Tensor  # [N] flat
    token_adapter: torch.Tensor  # int32 [T]
    a_row_offsets: torch.Tensor
    b_row_offsets: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    out_sizes: list[int]
    dense_a: list[list[torch.Tensor | None]]  # [adapter][slice] -> [r, in] float32, None if absent
    dense_b: list[list[torch.Tensor | None]]  # [adapter][slice] -> [out_s, r] float32

    @property
    def num_slices(self) -> int:
        return len(self.out_sizes)

    def meta(self, tile_tokens: int = 16, segment_min_tokens: int = 1) -> PagedLoRAMeta:
        m = PagedLoRAMeta(
            max(1, self.x.shape[0]) + 5, self.ranks.shape[0] + 3, self.x.device, tile_tokens, segment_min_tokens
        )
        m.prepare(self.token_adapter)
        return m

    def reference_shrink(self) -> torch.Tensor:
        """float32 [n_slices, T, R] from the dense matrices."""
        num_tokens, width = self.x.shape[0], self.a_row_offsets.shape[2]
        out = torch.zeros(self.num_slices, num_tokens, width, dtype=torch.float32)
        xf = self.x.cpu().double()
        for t, a in enumerate(self.token_adapter.tolist()):
            for s in range(self.num_slices):
                if a >= 0 and self.dense_a[a][s] is not None:
                    r = self.dense_a[a][s].shape[0]
                    out[s, t, :r] = (xf[t] @ self.dense_a[a][s].double().t()).float()
        return out

    def reference_linear(self) -> torch.Tensor:
        """y0 + LoRA delta in float64, from the dense matrices (shrink never rounded)."""
        y = self.y0.cpu().double().clone()
        xf = self.x.cpu().double()
        starts = [sum(self.out_sizes[:s]) for s in range(self.num_slices)]
        scal = self.scalings.tolist()
        for t, a in enumerate(self.token_adapter.tolist()):
            for s, size in enumerate(self.out_sizes):
                if a >= 0 and self.dense_a[a][s] is not None:
                    h = xf[t] @ self.dense_a[a][s].double().t()
                    y[t, starts[s] : starts[s] + size] += scal[a][s] * (h @ self.dense_b[a][s].double().t())
        return y


def make_case(
    *,
    num_tokens: int,
    popularity: str = "uniform",
    in_features: int = 64,
    out_sizes: tuple[int, ...] = (48,),
    dtype: torch.dtype = torch.float32,
    rank_choices: tuple[int, ...] = (1, 3, 8, 16, 17, 33),
    no_adapter_every: int = 0,  # every k-th token gets -1 (0: none)
    absent_slices: bool = True,  # some adapters lack some slices (rank 0)
    shuffle_tokens: bool = True,  # tokens of one adapter interleaved (decode) vs runs (prefill)
    page_elems: int = 1000,  # not a multiple of row lengths: rows leave gaps at page ends
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoRACase:
    gen = torch.Generator().manual_seed(seed)
    counts = adapter_counts(popularity, num_tokens) if num_tokens else []
    num_adapters = max(1, len(counts))
    num_slices = len(out_sizes)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    dense_a, dense_b, adapter_ranks, scalings = [], [], [], []
    for a in range(num_adapters):
        row_a, row_b, row_r = [], [], []
        for s in range(num_slices):
            r = rank_choices[int(torch.randint(len(rank_choices), (1,), generator=gen))]
            if absent_slices and num_slices > 1 and (a + s) % 4 == 3:
                r = 0
            row_r.append(r)
            row_a.append(randn(r, in_features, scale=in_features**-0.5).to(dtype).float() if r else None)
            row_b.append(randn(out_sizes[s], r, scale=max(r, 1) ** -0.5).to(dtype).float() if r else None)
        dense_a.append(row_a)
        dense_b.append(row_b)
        adapter_ranks.append(row_r)
        scalings.append([0.5 + 0.25 * ((a + s) % 5) for s in range(num_slices)])

    # Pages: every adapter gets its own blocks, block ids shuffled so page tables are
    # non-contiguous; unused pool space is NaN so any read outside a row poisons results.
    layouts = [lora_layer_layout(rk, in_features, out_sizes, page_elems) for rk in adapter_ranks]
    total_pages = sum(lay.num_pages for lay in layouts) + 3
    blocks = torch.randperm(total_pages, generator=gen).tolist()
    pool = torch.full((total_pages * page_elems,), float("nan"), dtype=dtype)
    packed, cursor = [], 0
    for a, lay in enumerate(layouts):
        ids = blocks[cursor : cursor + lay.num_pages]
        cursor += lay.num_pages
        lora_a = [m if m is not None else torch.zeros(0, in_features) for m in dense_a[a]]
        lora_b = [m if m is not None else torch.zeros(out_sizes[s], 0) for s, m in enumerate(dense_b[a])]
        packed.append(pack_lora_layer(pool, page_elems, ids, lora_a, lora_b))
    tables = build_row_tables(packed, scalings, device=device)

    token_adapter = torch.tensor([a for a, c in enumerate(counts) for _ in range(c)], dtype=torch.int32)
    if shuffle_tokens and num_tokens > 1:
        token_adapter = token_adapter[torch.randperm(num_tokens, generator=gen)]
    if no_adapter_every:
        token_adapter[::no_adapter_every] = -1
    x = randn(num_tokens, in_features).to(dtype)
    y0 = randn(num_tokens, sum(out_sizes)).to(dtype)
    return LoRACase(
        x=x.to(device),
        y0=y0.to(device),
        pool=pool.to(device),
        token_adapter=token_adapter.to(device),
        a_row_offsets=tables.a_row_offsets,
        b_row_offsets=tables.b_row_offsets,
        ranks=tables.ranks,
        scalings=tables.scalings,
        out_sizes=list(out_sizes),
        dense_a=dense_a,
        dense_b=dense_b,
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), atol=atol, rtol=rtol, equal_nan=False)


def assert_untouched_rows(y: torch.Tensor, y0: torch.Tensor, token_adapter: torch.Tensor) -> None:
    """Rows of tokens without adapter are bit-identical to the base output."""
    idle = (token_adapter.cpu() < 0).nonzero().squeeze(1)
    if idle.numel():
        before = y0.cpu()[idle].view(torch.int16 if y0.element_size() == 2 else torch.int32)
        after = y.cpu()[idle].view(torch.int16 if y.element_size() == 2 else torch.int32)
        assert torch.equal(before, after), "rows of tokens without adapter changed"


def step_token_map(
    slots: list[int], popularity: str, fill: float, idle_every: int, num_tokens: int, gen: torch.Generator
) -> torch.Tensor:
    """int32 [num_tokens]: a padded batch's token->slot map (static-table tests).

    The first ``round(fill * num_tokens)`` tokens are spread over ``slots`` with
    ``popularity`` (see `adapter_counts`) in random order, every ``idle_every``-th of them
    without adapter; the rest is padding (-1).
    """
    mapping = torch.full((num_tokens,), -1, dtype=torch.int32)
    real = max(1, round(fill * num_tokens))
    groups = adapter_counts(popularity, real)
    tokens = torch.tensor([slots[i % len(slots)] for i, c in enumerate(groups) for _ in range(c)],
                          dtype=torch.int32)  # fmt: skip
    tokens = tokens[torch.randperm(real, generator=gen)]
    if idle_every:
        tokens[::idle_every] = -1
    mapping[:real] = tokens
    return mapping


def require_triton_interpreter() -> None:
    """Skip unless Triton runs compiled on a GPU or was imported in interpreter mode."""
    import pytest
    import triton

    if torch.cuda.is_available():
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.standard.sum, InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run tests/kernels on its own")
