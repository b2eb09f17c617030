"""CPU proxy for CUDA-graph replay: one set of static tensors, many steps, fixed launches.

vLLM captures its CUDA graphs in a dummy run where no token has an adapter and replays
them for every later step. That is only correct if (1) the kernels read every per-step
value from tensors rewritten in place (the slot tables, the token->slot map over
max_tokens, the PagedLoRAMeta prepared over all of it) and (2) every launch decision
(form, grid, constexprs, split-K, zeroing of ``out``) depends on static bounds only.

Without a GPU this runs the Triton kernels in the interpreter (conftest.py), through the
public ops (kernels/ops.py routes CPU tensors to the torch path, so the tests tell it
to take the Triton path on CPU: `triton_path`), with one fixed batch size T per
"graph" (a per-token and a segment one) and a padded batch (entries past the step's
tokens are -1). Each step rewrites the same tensors in place with a different adapter
set (counts, ranks incl. a new maximum, popularity, tokens without adapter, shuffled
pages, NaN in free pages) and checks:

* results equal the dense oracle; rows of tokens without adapter keep their exact bits;
* every launch (kernel, grid, constexprs, scalar arguments, tensor addresses) and every
  kernels/triton_config.py decision for a given T is identical to the no-adapter step's;
* no static tensor changed address.

tests/gpu/test_triton_cuda_graphs.py is the same scenario with real graph capture.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass

import pytest
import torch

from kernels import PagedLoRAMeta, SlotTables, pack_lora_layer, paged_lora_expand, paged_lora_shrink
from kernels.packing import lora_layer_layout
from tests.kernels.lora_cases import assert_close, require_triton_interpreter, step_token_map

triton = pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

MAX_TOKENS = 24  # token_adapter / meta length (the worker's max_num_batched_tokens)
S_MAX = 6  # slots
WIDTH = 20  # R: table width; not a power of two, two rank tiles of the per-token shrink
TILE_TOKENS = 16
SEGMENT_MIN_TOKENS = 16
GRAPH_SIZES = (3, 20)  # one per-token "graph", one segment "graph"
MODULES = {"qkv": (40, (24, 8, 16)), "down": (56, (20,))}  # name: (in_features, out_sizes)
PAGE_ELEMS = 200  # not a multiple of the row lengths: rows leave gaps at page ends
# A small BLOCK_K (through the config hook) makes the per-token shrink split K at these
# tiny in_features, so the atomics path and the zeroing of `out` are covered too.
CONFIG_OVERRIDE = {"shrink_token": {"block_k_max": 16}}


@dataclass(frozen=True)
class Step:
    count: int  # distinct adapters in the step (1..S_MAX)
    popularity: str  # lora_cases.adapter_counts
    ranks: tuple[int, ...]  # rank choices per slice (0 = slice absent)
    fill: float = 1.0  # real tokens / T; the rest of the graph's batch is padding (-1)
    idle_every: int = 0  # every k-th real token has no adapter


STEPS = [
    Step(1, "identical", (1, 2)),
    Step(S_MAX, "distinct", (1, 3, 8, 0), idle_every=3),
    Step(4, "zipf", (5, WIDTH, 0), fill=0.6, idle_every=4),  # first use of the maximum rank
    Step(3, "skewed", (1, 9, WIDTH), fill=0.8),
    Step(2, "uniform", (2, 7), idle_every=2),  # small ranks after big ones: stale rows past rank
]


@pytest.fixture(autouse=True)
def triton_interpreter():
    """Without a GPU, Triton must have been imported in interpreter mode (conftest.py)."""
    require_triton_interpreter()


@pytest.fixture
def triton_path(monkeypatch):
    """The public ops take the Triton path (segment form included) on CPU tensors too."""
    if ON_GPU:
        return
    for name in ("kernels.ops", "vllm_slora.kernels.ops"):  # the module may be loaded twice
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "_use_triton", lambda t: True)
        real = module._segment_args
        monkeypatch.setattr(module, "_segment_args", lambda meta, n, on_cuda, real=real: real(meta, n, True))


def _describe(arg):
    if isinstance(arg, torch.Tensor):
        return ("tensor", arg.data_ptr(), tuple(arg.shape), arg.stride(), arg.dtype)
    return arg


class LaunchRecorder:
    """Wraps `jitted` and `get_launch_config` in the launcher modules; records every decision."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        # The launchers are loaded twice (as kernels.* and, through the installed package,
        # vllm_slora.kernels.*); which one a test reaches depends on what was imported first.
        for name in ("kernels.triton_shrink", "kernels.triton_expand",
                     "vllm_slora.kernels.triton_shrink", "vllm_slora.kernels.triton_expand"):
            module = importlib.import_module(name)
            monkeypatch.setattr(module, "jitted", self._jitted(module.jitted))
            monkeypatch.setattr(module, "get_launch_config", self._config(module.get_launch_config))

    def _config(self, real):
        def get_launch_config(op, **kwargs):
            config = real(op, **kwargs)
            self.events.append(("config", op, tuple(sorted((k, str(v)) for k, v in kwargs.items())),
                                tuple(sorted(config.items()))))  # fmt: skip
            return config

        return get_launch_config

    def _jitted(self, real):
        recorder = self

        def jitted(kernel):
            compiled = real(kernel)

            class Launch:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        recorder.events.append((
                            "launch", kernel.__name__, tuple(grid), tuple(_describe(a) for a in args),
                            tuple(sorted(kwargs.items())),
                        ))  # fmt: skip
                        return compiled[grid](*args, **kwargs)

                    return launch

            return Launch()

        return jitted

    def take(self) -> list[tuple]:
        events, self.events = self.events, []
        return events


class StaticState:
    """Everything a worker allocates once: pool, slot tables, token map, meta, activations."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        pages = 3
        for in_features, out_sizes in MODULES.values():
            pages += S_MAX * lora_layer_layout([WIDTH] * len(out_sizes), in_features, out_sizes, PAGE_ELEMS).num_pages
        self.num_pages = pages
        self.pool = torch.full((pages * PAGE_ELEMS,), float("nan"), dtype=dtype, device=DEVICE)
        self.tables = {m: SlotTables(1, S_MAX, len(outs), WIDTH, DEVICE) for m, (_, outs) in MODULES.items()}
        self.token_adapter = torch.full((MAX_TOKENS,), -1, dtype=torch.int32, device=DEVICE)
        self.meta = PagedLoRAMeta(MAX_TOKENS, S_MAX, DEVICE, TILE_TOKENS, SEGMENT_MIN_TOKENS)
        self.x = {m: torch.zeros(MAX_TOKENS, i, dtype=dtype, device=DEVICE) for m, (i, _) in MODULES.items()}
        self.y = {m: torch.zeros(MAX_TOKENS, sum(o), dtype=dtype, device=DEVICE) for m, (_, o) in MODULES.items()}
        self.buf = {m: torch.zeros(len(o), MAX_TOKENS, WIDTH, device=DEVICE) for m, (_, o) in MODULES.items()}
        # dense[slot][module] = (ranks, A per slice, B per slice, scalings) of the slot's adapter
        self.dense: dict[int, dict] = {}

    def static_tensors(self) -> list[torch.Tensor]:
        found = [self.pool, self.token_adapter, self.meta.token_order, self.meta.adapter_starts, self.meta.tiles]
        for m in MODULES:
            found += list(self.tables[m].tensors()) + [self.x[m], self.y[m], self.buf[m]]
        return found

    def addresses(self) -> list[int]:
        return [t.data_ptr() for t in self.static_tensors()]

    def write_adapters(self, step: Step, gen: torch.Generator) -> list[int]:
        """New adapters in ``step.count`` random slots (in place); returns the slots."""
        self.pool.fill_(float("nan"))  # free pages hold NaN: a stray read poisons results
        slots = torch.randperm(S_MAX, generator=gen)[: step.count].tolist()
        blocks = torch.randperm(self.num_pages, generator=gen).tolist()
        cursor = 0
        for slot in slots:
            self.dense[slot] = {}
            for m, (in_features, out_sizes) in MODULES.items():
                ranks = [step.ranks[int(torch.randint(len(step.ranks), (1,), generator=gen))] for _ in out_sizes]
                if not any(ranks):
                    ranks[0] = max(step.ranks)
                a = [(torch.randn(r, in_features, generator=gen) * in_features**-0.5).to(self.dtype).float()
                     for r in ranks]  # fmt: skip
                b = [(torch.randn(o, r, generator=gen) * max(r, 1) ** -0.5).to(self.dtype).float()
                     for r, o in zip(ranks, out_sizes)]  # fmt: skip
                scalings = [0.5 + 0.25 * int(torch.randint(5, (1,), generator=gen)) for _ in out_sizes]
                layout = lora_layer_layout(ranks, in_features, out_sizes, PAGE_ELEMS)
                ids = blocks[cursor : cursor + layout.num_pages]
                cursor += layout.num_pages
                packed = pack_lora_layer(self.pool, PAGE_ELEMS, ids, a, b)
                r_max = max(1, max(ranks))
                a_off = torch.zeros(1, len(ranks), r_max, dtype=torch.int64)
                b_off = torch.zeros(1, len(ranks), r_max, dtype=torch.int64)
                for s, r in enumerate(ranks):
                    a_off[0, s, :r] = packed.a_offsets[s]
                    b_off[0, s, :r] = packed.b_offsets[s]
                rank_t = torch.tensor([ranks], dtype=torch.int32)
                self.tables[m].write(slot, a_off, b_off, rank_t, rank_t, torch.tensor([scalings]))
                self.dense[slot][m] = (ranks, a, b, scalings)
        return slots

    def token_map(self, step: Step | None, slots: list[int], num_tokens: int, gen: torch.Generator) -> torch.Tensor:
        """int32 [num_tokens]: the step's tokens then padding, all -1 without a step."""
        if step is None:
            return torch.full((num_tokens,), -1, dtype=torch.int32)
        return step_token_map(slots, step.popularity, step.fill, step.idle_every, num_tokens, gen)

    def run(self, num_tokens: int) -> None:
        """One "graph": shrink + expand of every module over the first num_tokens entries."""
        tokens = self.token_adapter[:num_tokens]
        for m, (_, out_sizes) in MODULES.items():
            t = self.tables[m]
            a_off, b_off, ranks, scal = t.a_offsets[0], t.b_offsets[0], t.a_ranks[0], t.scalings[0]
            buf = self.buf[m][:, :num_tokens]
            paged_lora_shrink(self.x[m][:num_tokens], self.pool, a_off, ranks, tokens, buf, self.meta)
            paged_lora_expand(buf, self.pool, b_off, ranks, scal, tokens, self.y[m][:num_tokens], out_sizes, self.meta)

    def oracle(self, module: str, mapping: torch.Tensor, x: torch.Tensor, y0: torch.Tensor):
        """(shrink [n_slices, T, R], y [T, out]) in float64 from the dense matrices."""
        _, out_sizes = MODULES[module]
        shrink = torch.zeros(len(out_sizes), len(mapping), WIDTH, dtype=torch.float64)
        y = y0.double().clone()
        xd = x.double()
        starts = [sum(out_sizes[:s]) for s in range(len(out_sizes))]
        for t, slot in enumerate(mapping.tolist()):
            if slot < 0:
                continue
            ranks, a, b, scalings = self.dense[slot][module]
            for s, r in enumerate(ranks):
                if r:
                    h = xd[t] @ a[s].double().t()
                    shrink[s, t, :r] = h
                    y[t, starts[s] : starts[s] + out_sizes[s]] += scalings[s] * (h @ b[s].double().t())
        return shrink, y


def _check_step(state: StaticState, mapping: torch.Tensor, num_tokens: int, gen: torch.Generator) -> None:
    """Fill the activations (in place), run the "graph", compare with the oracle."""
    dtype = state.dtype
    x_in, y_in = {}, {}
    for m, (in_features, out_sizes) in MODULES.items():
        x_in[m] = torch.randn(num_tokens, in_features, generator=gen).to(dtype)
        y_in[m] = torch.randn(num_tokens, sum(out_sizes), generator=gen).to(dtype)
        idle = (mapping < 0).nonzero().squeeze(1)
        if idle.numel():  # values a `y += 0` would change (-0.0) or propagate (NaN)
            y_in[m][idle[0]] = -0.0
            y_in[m][idle[-1]] = float("nan")
        state.x[m][:num_tokens].copy_(x_in[m])
        state.y[m][:num_tokens].copy_(y_in[m])
        state.buf[m].fill_(7.0)  # the shrink must overwrite every row of the batch
    state.run(num_tokens)
    for m in MODULES:
        shrink_ref, y_ref = state.oracle(m, mapping, x_in[m], y_in[m])
        assert_close(
            state.buf[m][:, :num_tokens], shrink_ref, torch.float32 if dtype == torch.float32 else torch.float16
        )
        y = state.y[m][:num_tokens].cpu()
        adapted = mapping >= 0
        assert_close(y[adapted], y_ref[adapted], dtype)
        # Tokens without adapter (idle and padding): the exact bits of the base output.
        bits = torch.int16 if dtype != torch.float32 else torch.int32
        assert torch.equal(y[~adapted].view(bits), y_in[m][~adapted].view(bits)), f"{m}: idle rows changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_static_tensors_across_steps(dtype, triton_path, monkeypatch, tmp_path):
    config_file = tmp_path / "triton_config.json"
    config_file.write_text(json.dumps(CONFIG_OVERRIDE))
    monkeypatch.setenv("SLORA_TRITON_CONFIG", str(config_file))
    recorder = LaunchRecorder(monkeypatch)
    gen = torch.Generator().manual_seed(1234)
    state = StaticState(dtype)
    addresses = state.addresses()

    def step(current: Step | None, slots: list[int], num_tokens: int) -> list[tuple]:
        mapping = state.token_map(current, slots, num_tokens, gen)
        state.token_adapter.fill_(-1)
        state.token_adapter[:num_tokens].copy_(mapping)  # in place; entries past the step stay -1
        state.meta.prepare(state.token_adapter)  # over all max_tokens entries, as the worker does
        recorder.take()
        _check_step(state, mapping, num_tokens, gen)
        assert state.addresses() == addresses, "a static tensor was reallocated"
        return recorder.take()

    # The "capture": no adapter anywhere, tables still empty.
    captured = {n: step(None, [], n) for n in GRAPH_SIZES}
    kinds = {n: {e[1] for e in events if e[0] == "launch"} for n, events in captured.items()}
    assert kinds[GRAPH_SIZES[0]] == {"_shrink_token_kernel", "_expand_token_kernel"}, "Triton path not taken"
    assert kinds[GRAPH_SIZES[1]] == {"_shrink_segment_kernel", "_expand_segment_kernel"}, "segment form not taken"
    split = [dict(e[4])["SPLIT_K"] for e in captured[GRAPH_SIZES[0]] if e[:2] == ("launch", "_shrink_token_kernel")]
    assert min(split) > 1, f"the per-token shrink should split K here (config hook), got {split}"

    for current in STEPS + [None]:  # ...and back to a step without adapters
        slots = state.write_adapters(current, gen) if current is not None else []
        for n in GRAPH_SIZES:
            events = step(current, slots, n)
            assert events == captured[n], f"launches for T={n} differ from the no-adapter step's ({current})"


# -- kernels/triton_config.py ------------------------------------------------------------


def _config(op: str, **kwargs):
    from kernels.triton_config import get_launch_config

    args = dict(num_tokens=4, num_slices=3, max_rank=64, features=4096, device="cpu")
    args.update(kwargs)
    return get_launch_config(op, **args)


def test_config_defaults_match_the_former_hard_coded_values(monkeypatch):
    """Off CUDA the SM count is 132 (an H100's), so 264 programs are wanted in flight."""
    monkeypatch.delenv("SLORA_TRITON_CONFIG", raising=False)
    from kernels.triton_config import sm_count

    assert sm_count("cpu") == 132
    for num_tokens, rank, features in [(1, 8, 40), (4, 64, 4096), (64, 128, 11008), (300, 16, 300), (2, 20, 300)]:
        block_r = min(16, triton.next_power_of_2(rank))
        block_k = min(256, triton.next_power_of_2(features))
        programs = num_tokens * 3 * triton.cdiv(rank, block_r)
        split_k = 1 if programs >= 264 else min(triton.cdiv(features, block_k), triton.cdiv(264, programs), 16)
        kw = dict(num_tokens=num_tokens, max_rank=rank, features=features)
        assert _config("shrink_token", **kw) == {"BLOCK_R": block_r, "BLOCK_K": block_k, "SPLIT_K": split_k}
        pow2_r, pow2_f = triton.next_power_of_2(rank), triton.next_power_of_2(features)
        assert _config("shrink_segment", **kw) == {"BLOCK_R": max(16, min(64, pow2_r)),
                                                   "BLOCK_K": max(16, min(64, pow2_f))}  # fmt: skip
        assert _config("expand_token", **kw) == {"BLOCK_R": min(16, pow2_r), "BLOCK_N": 128}
        assert _config("expand_segment", **kw) == {"BLOCK_R": max(16, min(32, pow2_r)),
                                                   "BLOCK_N": max(16, min(64, pow2_f))}  # fmt: skip


def test_config_file_overrides(monkeypatch, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"sm_count": 8, "shrink_token": {"programs_per_sm": 1, "split_k_max": 3},
                                "expand_token": {"block_n": 64}}))  # fmt: skip
    monkeypatch.setenv("SLORA_TRITON_CONFIG", str(path))
    assert _config("expand_token") == {"BLOCK_R": 16, "BLOCK_N": 64}
    # 1 token x 1 slice x 1 rank tile < 8 programs wanted: split K by min(16 K blocks, 8, 3).
    assert _config("shrink_token", num_tokens=1, num_slices=1, max_rank=16)["SPLIT_K"] == 3
    assert _config("shrink_token", num_tokens=8, num_slices=1, max_rank=16)["SPLIT_K"] == 1


@pytest.mark.parametrize(
    "content,message",
    [
        ({"shrink_tokens": {}}, "unknown key 'shrink_tokens'"),
        ({"shrink_token": {"block_k": 64}}, "unknown key 'shrink_token.block_k'"),
        ({"expand_token": {"block_n": 96}}, "power of two"),
        ({"shrink_segment": {"block_k_min": 8}}, ">= 16"),
        ({"sm_count": 0}, "positive integer"),
    ],
)
def test_config_file_errors(monkeypatch, tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    monkeypatch.setenv("SLORA_TRITON_CONFIG", str(path))
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        _config("shrink_token")
    assert "SLORA_TRITON_CONFIG" in str(info.value) and str(path) in str(info.value)
