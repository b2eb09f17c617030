"""CUDA graphs of the Triton LoRA ops at Llama-7B shapes: captured once without adapters, replayed.

vLLM captures one CUDA graph per batch size in a dummy run where no token has an
adapter, then replays it for every later step. This test does the same with the static
metadata contract (kernels/slot_tables.py, the token->slot map over max_tokens, a
PagedLoRAMeta prepared over all max_tokens entries):

(a) all tables empty and every token -1: capture one graph per T in GRAPH_SIZES holding
    shrink + expand of every module of LAYERS layers through the public ops (per-token
    form for T < 128, segment form for T >= 128, chosen by the meta);
(b) for several steps, write a different adapter set into the SAME tensors with in-place
    copies (1..32 adapters, ranks 1..R mixed with absent slices, a new maximum rank,
    popularity distinct / uniform / zipf / skewed, tokens without adapter, padding past
    the step's tokens, shuffled pages, NaN in free pool pages), prepare the meta in
    place, replay, and compare with the torch reference (kernels/torch_ops.py, eager on
    the same tensors) and the dense float64 oracle. Rows of tokens without adapter must
    keep their exact bits, and no static tensor may change address.

Replay vs eager launch times are printed (run with -s to see them), not asserted.
tests/kernels/test_triton_static_tables.py is the CPU proxy of this scenario.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA: captures CUDA graphs of the Triton kernels", allow_module_level=True)
try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("needs Triton: the CUDA LoRA kernels are Triton kernels", allow_module_level=True)

from kernels import PagedLoRAMeta, SlotTables, pack_lora_layer, paged_lora_expand, paged_lora_shrink
from kernels.packing import lora_layer_layout
from kernels.torch_ops import expand_torch, shrink_torch
from tests.kernels.lora_cases import TOLERANCES, step_token_map

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
LAYERS = 2
MAX_TOKENS = 512
S_MAX = 32
GRAPH_SIZES = (1, 8, 64, 256)  # < 128: per-token form; >= 128: segment form (meta defaults)
# Llama-7B: name -> (in_features, out_sizes)
MODULES = {
    "qkv": (4096, (4096, 4096, 4096)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (11008, 11008)),
    "down": (11008, (4096,)),
}
PAGE_ELEMS = 16 * 2 * 4096  # one vLLM block of Llama-7B's KV cache per layer (16 tokens, K and V)


@dataclass(frozen=True)
class Step:
    count: int  # distinct adapters in the step
    popularity: str  # lora_cases.adapter_counts
    ranks: tuple[int, ...]  # rank choices per slice; 0 = slice absent
    fill: float = 1.0  # real tokens / T; the rest of the captured batch is padding (-1)
    idle_every: int = 0  # every k-th real token has no adapter


def steps_for(width: int) -> list[Step]:
    def r(rank: int) -> int:
        return min(rank, width)

    return [
        Step(1, "uniform", (1, r(8))),
        Step(S_MAX, "distinct", (1, 2, r(7), r(16), width // 2, 0), idle_every=5),
        Step(min(7, S_MAX), "zipf", (3, width, r(33)), idle_every=3),  # first use of the maximum rank R
        Step(min(12, S_MAX), "skewed", (width, 1, 0, r(17)), fill=0.5),
        Step(S_MAX, "uniform", (1, 4), fill=0.75, idle_every=4),  # small ranks after big: stale rows past rank
    ]


class StaticState:
    """Everything a worker allocates once, for LAYERS layers."""

    def __init__(self, dtype: torch.dtype, width: int):
        self.dtype, self.width = dtype, width
        pages = 3
        for in_features, out_sizes in MODULES.values():
            pages += S_MAX * lora_layer_layout([width] * len(out_sizes), in_features, out_sizes, PAGE_ELEMS).num_pages
        self.num_pages = pages
        self.pools = [torch.full((pages * PAGE_ELEMS,), float("nan"), dtype=dtype, device=DEVICE)
                      for _ in range(LAYERS)]  # fmt: skip
        self.tables = {m: SlotTables(LAYERS, S_MAX, len(o), width, DEVICE) for m, (_, o) in MODULES.items()}
        self.token_adapter = torch.full((MAX_TOKENS,), -1, dtype=torch.int32, device=DEVICE)
        self.meta = PagedLoRAMeta(MAX_TOKENS, S_MAX, DEVICE)
        self.x, self.y, self.buf = {}, {}, {}
        for layer in range(LAYERS):
            for m, (in_features, out_sizes) in MODULES.items():
                self.x[layer, m] = torch.zeros(MAX_TOKENS, in_features, dtype=dtype, device=DEVICE)
                self.y[layer, m] = torch.zeros(MAX_TOKENS, sum(out_sizes), dtype=dtype, device=DEVICE)
                self.buf[layer, m] = torch.zeros(len(out_sizes), MAX_TOKENS, width, device=DEVICE)
        # dense[layer, slot, module] = (ranks, A per slice, B per slice, scalings); A, B in dtype
        self.dense: dict[tuple[int, int, str], tuple] = {}

    def static_tensors(self) -> list[torch.Tensor]:
        found = list(self.pools) + [self.token_adapter, self.meta.token_order, self.meta.adapter_starts,
                                    self.meta.tiles]  # fmt: skip
        for tables in self.tables.values():
            found += list(tables.tensors())
        return found + list(self.x.values()) + list(self.y.values()) + list(self.buf.values())

    def addresses(self) -> list[int]:
        return [t.data_ptr() for t in self.static_tensors()]

    def layer_tables(self, layer: int, module: str):
        t = self.tables[module]
        return t.a_offsets[layer], t.b_offsets[layer], t.a_ranks[layer], t.scalings[layer]

    def run(self, num_tokens: int) -> None:
        """What one captured graph holds: every module of every layer, first num_tokens tokens."""
        tokens = self.token_adapter[:num_tokens]
        for layer in range(LAYERS):
            pool = self.pools[layer]
            for m, (_, out_sizes) in MODULES.items():
                a_off, b_off, ranks, scal = self.layer_tables(layer, m)
                buf = self.buf[layer, m][:, :num_tokens]
                x, y = self.x[layer, m][:num_tokens], self.y[layer, m][:num_tokens]
                paged_lora_shrink(x, pool, a_off, ranks, tokens, buf, self.meta)
                paged_lora_expand(buf, pool, b_off, ranks, scal, tokens, y, out_sizes, self.meta)

    def write_adapters(self, step: Step, gen: torch.Generator, cuda_gen: torch.Generator) -> list[int]:
        """``step.count`` new adapters in random slots, written in place; returns the slots."""
        for pool in self.pools:
            pool.fill_(float("nan"))  # free pages hold NaN: a stray read poisons the result
        slots = torch.randperm(S_MAX, generator=gen)[: step.count].tolist()
        blocks = [torch.randperm(self.num_pages, generator=gen).tolist() for _ in range(LAYERS)]  # per layer
        cursor = 0
        for slot in slots:
            for m, (in_features, out_sizes) in MODULES.items():
                ranks = [step.ranks[int(torch.randint(len(step.ranks), (1,), generator=gen))] for _ in out_sizes]
                if not any(ranks):
                    ranks[0] = max(step.ranks)
                scalings = [[0.5 + 0.25 * int(torch.randint(5, (1,), generator=gen)) for _ in out_sizes]
                            for _ in range(LAYERS)]  # fmt: skip
                r_max = max(1, max(ranks))
                a_off = torch.zeros(LAYERS, len(ranks), r_max, dtype=torch.int64)
                b_off = torch.zeros(LAYERS, len(ranks), r_max, dtype=torch.int64)
                layout = lora_layer_layout(ranks, in_features, out_sizes, PAGE_ELEMS)
                for layer in range(LAYERS):
                    a = [(torch.randn(r, in_features, generator=cuda_gen, device=DEVICE) * in_features**-0.5)
                         .to(self.dtype) for r in ranks]  # fmt: skip
                    b = [(torch.randn(o, r, generator=cuda_gen, device=DEVICE) * max(r, 1) ** -0.5).to(self.dtype)
                         for r, o in zip(ranks, out_sizes)]  # fmt: skip
                    ids = blocks[layer][cursor : cursor + layout.num_pages]
                    packed = pack_lora_layer(self.pools[layer], PAGE_ELEMS, ids, a, b)
                    for s, r in enumerate(ranks):
                        a_off[layer, s, :r] = packed.a_offsets[s]
                        b_off[layer, s, :r] = packed.b_offsets[s]
                    self.dense[layer, slot, m] = (ranks, a, b, scalings[layer])
                cursor += layout.num_pages
                rank_t = torch.tensor([ranks] * LAYERS, dtype=torch.int32)
                self.tables[m].write(slot, a_off, b_off, rank_t, rank_t, torch.tensor(scalings))
        return slots

    def token_map(self, step: Step, slots: list[int], num_tokens: int, gen: torch.Generator) -> torch.Tensor:
        """int32 [num_tokens] on the host: the step's tokens, then padding (-1)."""
        return step_token_map(slots, step.popularity, step.fill, step.idle_every, num_tokens, gen)

    def oracle(self, layer: int, module: str, mapping: torch.Tensor, x: torch.Tensor, y0: torch.Tensor):
        """(shrink [n_slices, T, R], y [T, out]) in float64 from the dense matrices."""
        _, out_sizes = MODULES[module]
        num_tokens = mapping.shape[0]
        shrink = torch.zeros(len(out_sizes), num_tokens, self.width, dtype=torch.float64, device=DEVICE)
        y = y0.double().clone()
        xd = x.double()
        mapping = mapping.to(DEVICE)
        starts = [sum(out_sizes[:s]) for s in range(len(out_sizes))]
        for slot in sorted(set(mapping.tolist()) - {-1}):
            idx = (mapping == slot).nonzero().squeeze(1)
            ranks, a, b, scalings = self.dense[layer, slot, module]
            for s, r in enumerate(ranks):
                if r:
                    h = xd[idx] @ a[s].double().t()  # [n, r]
                    shrink[s, idx, :r] = h
                    y[idx, starts[s] : starts[s] + out_sizes[s]] += scalings[s] * (h @ b[s].double().t())
        return shrink, y


def _capture(state: StaticState) -> dict[int, torch.cuda.CUDAGraph]:
    """(a): no adapter anywhere; warm up (compiles the kernels), then one graph per T."""
    state.token_adapter.fill_(-1)
    state.meta.prepare(state.token_adapter)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for num_tokens in GRAPH_SIZES:
            state.run(num_tokens)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs = {}
    for num_tokens in GRAPH_SIZES:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            state.run(num_tokens)
        graphs[num_tokens] = graph
    torch.cuda.synchronize()
    return graphs


def _replay_and_check(state, graph, mapping: torch.Tensor, gen: torch.Generator) -> None:
    num_tokens = mapping.shape[0]
    dtype = state.dtype
    state.token_adapter.fill_(-1)  # in place; entries past the step's tokens stay -1
    state.token_adapter[:num_tokens].copy_(mapping)
    state.meta.prepare(state.token_adapter)  # over all MAX_TOKENS entries, as the worker does
    idle = (mapping < 0).nonzero().squeeze(1)
    inputs = {}
    for key, x in state.x.items():
        x_in = torch.randn(num_tokens, x.shape[1], generator=gen).to(dtype).to(DEVICE)
        y_in = torch.randn(num_tokens, state.y[key].shape[1], generator=gen).to(dtype).to(DEVICE)
        if idle.numel():  # values a `y += 0` would change (-0.0) or propagate (NaN)
            y_in[idle[0]] = -0.0
            y_in[idle[-1]] = float("nan")
        x[:num_tokens].copy_(x_in)
        state.y[key][:num_tokens].copy_(y_in)
        state.buf[key].fill_(7.0)  # the shrink must overwrite every row of the batch
        inputs[key] = (x_in, y_in)
    graph.replay()
    torch.cuda.synchronize()

    tokens = state.token_adapter[:num_tokens]
    adapted = (mapping >= 0).to(DEVICE)
    bits = torch.int16  # fp16 / bf16
    shrink_dtype = torch.float16  # tolerance of an fp32 shrink of half-precision inputs
    for (layer, m), (x_in, y_in) in inputs.items():
        _, out_sizes = MODULES[m]
        y = state.y[layer, m][:num_tokens]
        buf = state.buf[layer, m][:, :num_tokens]
        # Torch reference, eager, on the same static tensors (its own outputs).
        a_off, b_off, ranks, scal = state.layer_tables(layer, m)
        pool = state.pools[layer]
        buf_ref = torch.empty_like(buf)
        y_ref = y_in.clone()
        shrink_torch(state.x[layer, m][:num_tokens], pool, a_off, ranks, tokens, buf_ref)
        expand_torch(buf_ref, pool, b_off, ranks, scal, tokens, y_ref, out_sizes)
        shrink_oracle, y_oracle = state.oracle(layer, m, mapping, x_in, y_in)
        where = f"layer {layer} {m} T={num_tokens}"
        _close(buf, buf_ref, shrink_dtype, f"{where}: shrink vs torch")
        _close(buf, shrink_oracle, shrink_dtype, f"{where}: shrink vs oracle")
        _close(y[adapted], y_ref[adapted], dtype, f"{where}: y vs torch")
        _close(y[adapted], y_oracle[adapted], dtype, f"{where}: y vs oracle")
        assert torch.equal(y[~adapted].view(bits), y_in[~adapted].view(bits)), f"{where}: idle rows changed"
        assert not buf[:, ~adapted].any(), f"{where}: shrink rows of tokens without adapter not zero"


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    """lora_cases.assert_close, compared on the device (these tensors are large)."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=False,
                               msg=lambda m: f"{where}: {m}")  # fmt: skip


def _time_us(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


@pytest.mark.parametrize(
    "dtype,width",
    [(torch.float16, 64), (torch.bfloat16, 64), (torch.bfloat16, 128)],
    ids=["fp16-R64", "bf16-R64", "bf16-R128"],
)
def test_graphs_captured_without_adapters_replay_every_step(dtype, width):
    gen = torch.Generator().manual_seed(width)
    cuda_gen = torch.Generator(device=DEVICE).manual_seed(width)
    state = StaticState(dtype, width)
    addresses = state.addresses()
    graphs = _capture(state)
    assert state.addresses() == addresses

    for step in steps_for(width):
        slots = state.write_adapters(step, gen, cuda_gen)
        for num_tokens, graph in graphs.items():
            _replay_and_check(state, graph, state.token_map(step, slots, num_tokens, gen), gen)
            assert state.addresses() == addresses, "a static tensor was reallocated"

    # Figures only: one graph replay vs the same launches issued eagerly (last step's data).
    for num_tokens, graph in graphs.items():
        replay_us = _time_us(graph.replay)
        eager_us = _time_us(lambda n=num_tokens: state.run(n))
        print(f"\n{dtype} R={width} T={num_tokens}: {LAYERS} layers x {len(MODULES)} modules, "
              f"replay {replay_us:.0f} us, eager {eager_us:.0f} us ({eager_us / replay_us:.1f}x)")  # fmt: skip
    assert state.addresses() == addresses
