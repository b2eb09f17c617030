"""Paged heterogeneous-rank LoRA (shrink + expand) vs padded and per-adapter baselines.

Shapes: Llama-2-7B and Llama-3-8B projections (qkv_proj: 3 slices, down_proj: 1 slice);
decode batches {1, 16, 64, 256} and prefill {512, 4096} tokens; {1, 8, 64, all-distinct}
adapters with ranks drawn from {8, 16, 32, 64}. All-distinct = one adapter per token for
decode, one per 16-token sequence for prefill (at most 256).

Providers, timed in the same run after a correctness check against the dense loop:

* paged  : kernels.paged_lora_linear reading A/B from shuffled pool pages (ours)
* padded : weights stacked [A, max_rank, ...] as fixed slots imply; decode gathers them
           per token (bmm), prefill runs per adapter on the padded matrices
* loop   : per-adapter torch loop on exact-rank contiguous weights

Bandwidth counts the bytes that must move: the used adapters' weights at their own rank,
x once, y read and written. CUDA timings replay a CUDA graph (as vLLM decodes) with the
L2 cache flushed before every call; the flush is timed alone and subtracted.

    python benchmarks/kernels/benchmark_paged_lora.py               # full sweep, CUDA
    python benchmarks/kernels/benchmark_paged_lora.py --smoke       # tiny shapes, any device
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kernels import PagedLoRAMeta, build_row_tables, pack_lora_layer, paged_lora_linear  # noqa: E402
from kernels.packing import lora_layer_layout  # noqa: E402

RANKS = (8, 16, 32, 64)
# Peak HBM bandwidth by device name (GB/s); unknown devices use the measured copy rate.
HBM_PEAK_GBPS = {"H100 PCIe": 2039, "H100 NVL": 3900, "H100": 3352, "H200": 4800, "A100": 2039}


@dataclass(frozen=True)
class Module:
    model: str
    name: str
    in_features: int
    out_sizes: tuple[int, ...]
    kv_heads: int  # sets the KV page: 16 tokens x (K, V) x kv_heads x head_dim 128

    @property
    def page_elems(self) -> int:
        return 16 * 2 * self.kv_heads * 128


MODULES = [
    Module("llama-2-7b", "qkv_proj", 4096, (4096, 4096, 4096), 32),
    Module("llama-2-7b", "down_proj", 11008, (4096,), 32),
    Module("llama-3-8b", "qkv_proj", 4096, (4096, 1024, 1024), 8),
    Module("llama-3-8b", "down_proj", 14336, (4096,), 8),
]
PHASES = {"decode": [1, 16, 64, 256], "prefill": [512, 4096]}
ADAPTERS = ["1", "8", "64", "distinct"]


def num_adapters(spec: str, phase: str, tokens: int) -> int:
    if spec != "distinct":
        return min(int(spec), tokens)
    return tokens if phase == "decode" else min(256, tokens // 16)


class Workload:
    """Random adapters packed into a pool (shuffled blocks) plus the baselines' dense copies."""

    def __init__(self, module: Module, tokens: int, adapters: int, phase: str, dtype, device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        n, k = len(module.out_sizes), module.in_features
        self.module, self.tokens, self.phase = module, tokens, phase
        self.ranks = [[RANKS[int(torch.randint(len(RANKS), (1,), generator=gen))]] * n for _ in range(adapters)]
        self.scalings = [[2.0] * n for _ in range(adapters)]
        page_elems = module.page_elems
        layouts = [lora_layer_layout(r, k, module.out_sizes, page_elems) for r in self.ranks]
        total = sum(lay.num_pages for lay in layouts)
        blocks = torch.randperm(total, generator=gen).tolist()
        self.pool = torch.zeros(total * page_elems, dtype=dtype, device=device)
        self.dense_a, self.dense_b, packed, cursor = [], [], [], 0
        for a, lay in enumerate(layouts):
            la = [torch.randn(r, k, generator=gen).mul_(k**-0.5).to(dtype).to(device) for r in self.ranks[a]]
            lb = [torch.randn(o, r, generator=gen).mul_(r**-0.5).to(dtype).to(device)
                  for o, r in zip(module.out_sizes, self.ranks[a])]  # fmt: skip
            packed.append(pack_lora_layer(self.pool, page_elems, blocks[cursor : cursor + lay.num_pages], la, lb))
            cursor += lay.num_pages
            self.dense_a.append(la)
            self.dense_b.append(lb)
        self.tables = build_row_tables(packed, self.scalings, device=device)
        # Decode: tokens of one adapter interleaved; prefill: sequences are contiguous runs.
        per = [tokens // adapters + (1 if i < tokens % adapters else 0) for i in range(adapters)]
        mapping = torch.tensor([a for a, c in enumerate(per) for _ in range(c)], dtype=torch.int32)
        if phase == "decode":
            mapping = mapping[torch.randperm(tokens, generator=gen)]
        self.token_adapter = mapping.to(device)
        self.x = torch.randn(tokens, k, generator=gen).to(dtype).to(device)
        self.y = torch.randn(tokens, sum(module.out_sizes), generator=gen).to(dtype).to(device)
        self.meta = PagedLoRAMeta(tokens, adapters, device)
        self.meta.prepare(self.token_adapter)
        self.buf = torch.empty(n, tokens, self.tables.a_row_offsets.shape[2], dtype=torch.float32, device=device)
        self._groups = [(a, (mapping == a).nonzero().squeeze(1).to(device)) for a in range(adapters)]
        self._build_padded(device, dtype)

    def _build_padded(self, device, dtype) -> None:
        r_max = max(max(r) for r in self.ranks)
        k, adapters = self.module.in_features, len(self.ranks)
        self.pad_a = [torch.zeros(adapters, r_max, k, dtype=dtype, device=device) for _ in self.module.out_sizes]
        self.pad_b = [torch.zeros(adapters, o, r_max, dtype=dtype, device=device) for o in self.module.out_sizes]
        for a in range(adapters):
            for s, r in enumerate(self.ranks[a]):
                self.pad_a[s][a, :r] = self.dense_a[a][s]
                self.pad_b[s][a, :, :r] = self.dense_b[a][s]

    def weight_bytes(self) -> int:
        used = set(self.token_adapter.tolist())
        k = self.module.in_features
        elems = sum(r * (k + o) for a in used for r, o in zip(self.ranks[a], self.module.out_sizes))
        return elems * self.x.element_size()

    def activation_bytes(self) -> int:
        return (self.x.numel() + 2 * self.y.numel()) * self.x.element_size()

    # Providers: each computes y += LoRA(x) in place.
    def paged(self, y) -> None:
        t = self.tables
        paged_lora_linear(y, self.x, self.pool, t.a_row_offsets, t.b_row_offsets, t.ranks, t.scalings,
                          self.token_adapter, self.module.out_sizes, meta=self.meta, buf=self.buf)  # fmt: skip

    def padded(self, y) -> None:
        start = 0
        idx = self.token_adapter.long()
        for s, size in enumerate(self.module.out_sizes):
            if self.phase == "decode":  # per-token gather of padded slots, as bmm
                h = torch.bmm(self.pad_a[s][idx], self.x[:, :, None])  # [T, R, 1]
                delta = torch.bmm(self.pad_b[s][idx], h)[:, :, 0]  # [T, out]
                y[:, start : start + size] += 2.0 * delta
            else:
                for a, tokens in self._groups:
                    h = self.x[tokens] @ self.pad_a[s][a].t()
                    y[:, start : start + size].index_add_(0, tokens, (2.0 * h) @ self.pad_b[s][a].t())
            start += size

    def loop(self, y) -> None:
        start = 0
        for s, size in enumerate(self.module.out_sizes):
            for a, tokens in self._groups:
                h = self.x[tokens] @ self.dense_a[a][s].t()
                y[:, start : start + size].index_add_(0, tokens, (2.0 * h) @ self.dense_b[a][s].t())
            start += size


def time_cuda(fn, flush: torch.Tensor, reps: int = 20) -> float:
    """Mean seconds of fn() from a CUDA graph, each call after an L2 flush (flush time removed)."""

    def graph_of(body):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            body()  # warm-up: compiles Triton kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                body()
        return g

    def run(g) -> float:
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    with_fn = graph_of(lambda: (flush.zero_(), fn()))
    flush_only = graph_of(flush.zero_)
    return max(run(with_fn) - run(flush_only), 1e-9)


def time_cpu(fn, reps: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def copy_bandwidth_gbps(device) -> float:
    """Measured device-to-device copy rate (read + write), a floor for the peak."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1e3) / 1e9


def peak_gbps(name: str, measured: float) -> float:
    for key, value in HBM_PEAK_GBPS.items():
        if key in name:
            return float(value)
    return measured


def run_config(module, phase, tokens, adapter_spec, dtype, device, flush) -> dict:
    adapters = num_adapters(adapter_spec, phase, tokens)
    w = Workload(module, tokens, adapters, phase, dtype, device)
    outputs = {}
    for name in ("paged", "padded", "loop"):
        y = w.y.clone()
        getattr(w, name)(y)
        outputs[name] = y.float()
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    for name in ("paged", "padded"):
        err = (outputs[name] - outputs["loop"]).abs().max().item()
        scale = (outputs["loop"] - w.y.float()).abs().max().item()
        assert err <= tol * max(1.0, scale) * 4, f"{name} disagrees with the loop: {err} (delta scale {scale})"
    times = {}
    for name in ("paged", "padded", "loop"):
        y = w.y.clone()
        fn = (lambda f=getattr(w, name), y=y: f(y))  # noqa: B008  (binds this loop's method)
        times[name] = time_cuda(fn, flush) if device.type == "cuda" else time_cpu(fn)
    moved = w.weight_bytes() + w.activation_bytes()
    return {
        "model": module.model, "module": module.name, "phase": phase, "tokens": tokens,
        "adapters": adapters, "adapter_spec": adapter_spec, "ranks_used": sorted({r[0] for r in w.ranks}),
        "weight_bytes": w.weight_bytes(), "bytes_moved": moved,
        "time_us": {k: v * 1e6 for k, v in times.items()},
        "paged_gbps": moved / times["paged"] / 1e9,
        "speedup_vs_padded": times["padded"] / times["paged"],
        "speedup_vs_loop": times["loop"] / times["paged"],
    }  # fmt: skip


def plot(rows: list[dict], peak: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model'][6:]} {r['module'][:4]} {r['phase'][0]}{r['tokens']} A{r['adapters']}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(10, len(rows) * 0.22), 8), sharex=True)
    ax1.bar(range(len(rows)), [100 * r["paged_gbps"] / peak for r in rows], color="tab:blue")
    ax1.axhline(70, color="gray", ls="--", lw=1)
    ax1.set_ylabel("paged: % of HBM peak")
    ax1.set_title(title)
    ax2.plot(range(len(rows)), [r["speedup_vs_padded"] for r in rows], "o", label="vs padded (fixed slots)")
    ax2.plot(range(len(rows)), [r["speedup_vs_loop"] for r in rows], "x", label="vs per-adapter loop")
    ax2.axhline(1, color="gray", lw=1)
    ax2.set_yscale("log")
    ax2.set_ylabel("speedup of paged")
    ax2.legend()
    ax2.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU sanity run)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    modules, phases, adapter_specs = MODULES, PHASES, ADAPTERS
    if args.smoke:
        modules = [Module("tiny", "qkv_proj", 256, (256, 64, 64), 1), Module("tiny", "down_proj", 512, (256,), 1)]
        phases, adapter_specs = {"decode": [1, 16], "prefill": [64]}, ["1", "distinct"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    measured = copy_bandwidth_gbps(device)
    peak = peak_gbps(name, measured)
    flush = torch.empty(64 << 20, dtype=torch.int32, device=device) if device.type == "cuda" else None
    rows = []
    for module in modules:
        for phase, sizes in phases.items():
            for tokens in sizes:
                for spec in adapter_specs:
                    row = run_config(module, phase, tokens, spec, dtype, device, flush)
                    row["paged_pct_peak"] = 100 * row["paged_gbps"] / peak
                    rows.append(row)
                    t = row["time_us"]
                    print(f"{module.model:10} {module.name:9} {phase:7} T={tokens:5} A={row['adapters']:4} "
                          f"paged {t['paged']:9.1f}us ({row['paged_pct_peak']:5.1f}% peak) "
                          f"padded x{row['speedup_vs_padded']:6.2f} loop x{row['speedup_vs_loop']:7.2f}",
                          flush=True)  # fmt: skip
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    tag = "smoke" if args.smoke else device.type
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "paged_lora", "utc": stamp, "device": name, "device_type": device.type,
        "dtype": args.dtype, "hbm_peak_gbps": peak, "measured_copy_gbps": measured,
        "torch": torch.__version__, "triton": _triton_version(), "python": platform.python_version(),
        "config": {"ranks": RANKS, "phases": phases, "adapters": adapter_specs,
                   "modules": [m.__dict__ for m in modules]},
        "rows": rows,
    }  # fmt: skip
    json_path = args.out_dir / f"kernels-paged-lora-{tag}.json"
    json_path.write_text(json.dumps(result, indent=1))
    plot(rows, peak, args.out_dir / f"kernels-paged-lora-{tag}.png", f"paged LoRA on {name} ({args.dtype})")
    print(f"wrote {json_path}")


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
