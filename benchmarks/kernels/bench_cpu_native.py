"""Native CPU paged LoRA kernel vs the torch path on SmolLM2-135M shapes, against read bandwidth.

SmolLM2-135M: hidden 576, intermediate 1536, 30 layers; per layer the 7 LoRA projections
as vLLM calls them: qkv_proj (3 slices 576/192/192), o_proj (576), gate_up_proj (2 x 1536),
down_proj (1536 -> 576). 32 adapters with ranks drawn from {8, 16, 32, 64}, each with its
own pages of a per-(layer, module) pool (shuffled blocks, KV-sized pages of 6144 elements).

Phases: decode = 64 tokens, 2 per adapter, interleaved; prefill = 512 tokens, 4 sequences
of 128 consecutive tokens (4 adapters).

Paths, each timed as shrink + expand per (layer, module) over all 30 layers (the weights of
all layers together exceed the L3 cache, so every pass reads them from memory):

* native-<isa>: torch.ops.slora_cpu (kernels/cpu_native.py), every ISA this CPU supports
* torch: kernels/torch_ops.py shrink_torch/expand_torch with the token plan and the row runs
  prepared once (as vllm_slora's torch backend caches them per step)

Time per call = the best of several passes for each (layer, module), averaged over layers.
Rate = adapter weight bytes the call must read (the used adapters' A and B at their own
rank) / time, next to this machine's plain read bandwidth measured in the same run
(torch.sum over a 512 MB fp32 tensor, same threads).

    python benchmarks/kernels/bench_cpu_native.py            # writes benchmarks/results/cpu_native_kernel-*
    python benchmarks/kernels/bench_cpu_native.py --quick    # fewer passes, no files
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kernels import build_row_tables, cpu_native  # noqa: E402
from kernels.packing import PackedRows, lora_layer_layout  # noqa: E402
from kernels.torch_ops import expand_torch, plan_tokens, prepare_runs, row_runs, shrink_torch  # noqa: E402

LAYERS = 30
HIDDEN, INTERMEDIATE = 576, 1536
MODULES = {  # name: (in_features, out_sizes); 7 projections in 4 calls
    "qkv_proj": (HIDDEN, (576, 192, 192)),
    "o_proj": (HIDDEN, (HIDDEN,)),
    "gate_up_proj": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    "down_proj": (INTERMEDIATE, (HIDDEN,)),
}
ADAPTERS = 32
RANKS = (8, 16, 32, 64)
PAGE_ELEMS = 16 * 2 * 3 * 64  # 16 tokens x (K, V) x 3 KV heads x head_dim 64
PHASES = {"decode": (64, 2, True), "prefill": (512, 128, False)}  # tokens, tokens per adapter, interleaved


class ModuleWeights:
    """One (layer, module): 32 adapters' rows in a pool with shuffled pages."""

    def __init__(self, in_features, out_sizes, adapter_ranks, dtype, gen):
        self.in_features, self.out_sizes = in_features, list(out_sizes)
        layouts = [lora_layer_layout(r, in_features, out_sizes, PAGE_ELEMS) for r in adapter_ranks]
        total = sum(lay.num_pages for lay in layouts)
        blocks = torch.randperm(total, generator=gen).tolist()
        self.pool = (torch.randn(total * PAGE_ELEMS, generator=gen) * 0.05).to(dtype)
        packed, cursor = [], 0
        for lay in layouts:
            offsets = lay.row_offsets(blocks[cursor : cursor + lay.num_pages])
            cursor += lay.num_pages
            packed.append(PackedRows(tuple(offsets[0::2]), tuple(offsets[1::2])))
        scalings = [[0.5] * len(out_sizes) for _ in adapter_ranks]
        self.tables = build_row_tables(packed, scalings, max_rank=max(RANKS))
        self.runs_a = row_runs(self.tables.a_row_offsets, self.tables.ranks, in_features)
        self.runs_b = row_runs(self.tables.b_row_offsets, self.tables.ranks, self.out_sizes)

    def flops(self, token_adapter) -> int:
        """2 * (multiply-adds of shrink + expand) for this batch."""
        ranks = self.tables.ranks.tolist()
        return sum(2 * r * (self.in_features + o) for a in token_adapter.tolist() for r, o in zip(ranks[a], self.out_sizes))

    def bytes_read(self, adapters_used) -> int:
        ranks = self.tables.ranks.tolist()
        elem = self.pool.element_size()
        return sum(r * (self.in_features + o) * elem for a in adapters_used for r, o in zip(ranks[a], self.out_sizes))


def read_bandwidth_gbs(threads: int) -> float:
    torch.set_num_threads(threads)
    t = torch.ones(128 * 1024 * 1024, dtype=torch.float32)  # 512 MB
    torch.sum(t)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.sum(t)
        times.append(time.perf_counter() - t0)
    return t.numel() * 4 / min(times) / 1e9


def machine_info() -> dict:
    cpu, flags = platform.processor(), []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "f16c", "amx")))
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cpu_flags": flags,
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "native_kernel": cpu_native.available(),
        "native_isas": cpu_native.supported_isas() if cpu_native.available() else [],
    }


def make_workload(phase: str, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_tokens, per_adapter, interleaved = PHASES[phase]
    # Same seed for both phases: the same adapters (one rank per adapter and module).
    layers = []
    for _ in range(LAYERS):
        mods = {}
        for name, (in_f, outs) in MODULES.items():
            adapter_ranks = [[RANKS[int(torch.randint(len(RANKS), (1,), generator=gen))]] * len(outs)
                             for _ in range(ADAPTERS)]  # fmt: skip
            mods[name] = ModuleWeights(in_f, outs, adapter_ranks, dtype, gen)
        layers.append(mods)
    used = num_tokens // per_adapter
    token_adapter = torch.arange(used, dtype=torch.int32).repeat_interleave(per_adapter)
    if interleaved:
        token_adapter = token_adapter[torch.randperm(num_tokens, generator=gen)]
    if used < ADAPTERS:  # prefill: spread the sequences over the adapter table
        token_adapter = token_adapter * (ADAPTERS // used)
    xs = {name: torch.randn(num_tokens, in_f, generator=gen).to(dtype) for name, (in_f, _) in MODULES.items()}
    ys = {name: torch.zeros(num_tokens, sum(outs), dtype=dtype) for name, (_, outs) in MODULES.items()}
    bufs = {name: torch.zeros(len(outs), num_tokens, max(RANKS)) for name, (_, outs) in MODULES.items()}
    return layers, token_adapter, xs, ys, bufs


def run_pass(path: str, layers, token_adapter, xs, ys, bufs, prepared, plan) -> dict[tuple[int, str], float]:
    """One pass over all layers; seconds per (layer, module)."""
    spent = {}
    for li, mods in enumerate(layers):
        for name, w in mods.items():
            t = w.tables
            x, y, buf = xs[name], ys[name], bufs[name]
            t0 = time.perf_counter()
            if path == "torch":
                runs_a, runs_b = prepared[li][name]
                shrink_torch(x, w.pool, t.a_row_offsets, t.ranks, token_adapter, buf, plan=plan, runs=runs_a)
                expand_torch(buf, w.pool, t.b_row_offsets, t.ranks, t.scalings, token_adapter, y, w.out_sizes,
                             plan=plan, runs=runs_b)  # fmt: skip
            else:
                cpu_native.shrink(x, w.pool, t.a_row_offsets, t.ranks, token_adapter, buf)
                cpu_native.expand(buf, w.pool, t.b_row_offsets, t.ranks, t.scalings, token_adapter, y, w.out_sizes)
            spent[li, name] = time.perf_counter() - t0
    return spent


def check_paths_agree(layers, token_adapter, xs, plan, prepared, dtype) -> None:
    """Native (every ISA) and torch give the same result on one (layer, module) before timing."""
    w, name = layers[0]["qkv_proj"], "qkv_proj"
    t, x = w.tables, xs[name]
    buf_t = torch.zeros(3, x.shape[0], max(RANKS))
    y_t = torch.zeros(x.shape[0], sum(w.out_sizes), dtype=dtype)
    shrink_torch(x, w.pool, t.a_row_offsets, t.ranks, token_adapter, buf_t, plan=plan, runs=prepared[0][name][0])
    expand_torch(buf_t, w.pool, t.b_row_offsets, t.ranks, t.scalings, token_adapter, y_t, w.out_sizes, plan=plan,
                 runs=prepared[0][name][1])  # fmt: skip
    for isa in cpu_native.supported_isas():
        os.environ["SLORA_CPU_ISA"] = isa
        buf_n, y_n = torch.zeros_like(buf_t), torch.zeros_like(y_t)
        cpu_native.shrink(x, w.pool, t.a_row_offsets, t.ranks, token_adapter, buf_n)
        cpu_native.expand(buf_n, w.pool, t.b_row_offsets, t.ranks, t.scalings, token_adapter, y_n, w.out_sizes)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(buf_n, buf_t, atol=tol, rtol=tol)
        torch.testing.assert_close(y_n.float(), y_t.float(), atol=tol, rtol=tol)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer passes, nothing written")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--phases", default="decode,prefill")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if not cpu_native.available():
        sys.exit(cpu_native.unavailable_reason())
    threads = args.threads
    torch.set_num_threads(threads)
    machine = machine_info()
    bw = {n: read_bandwidth_gbs(n) for n in sorted({1, threads})}
    torch.set_num_threads(threads)
    print(f"# {machine['cpu_model']}, {threads} threads, torch {torch.__version__}, ISAs {machine['native_isas']}")
    print("# plain read bandwidth (torch.sum, 512 MB fp32): " + ", ".join(f"{v:.1f} GB/s @ {n} thr" for n, v in bw.items()))

    paths = [(f"native-{isa}", isa, threads) for isa in reversed(cpu_native.supported_isas())]
    paths.append((f"native-{cpu_native.detected_isa()}", cpu_native.detected_isa(), 1))
    paths += [("torch", None, threads), ("torch", None, 1)]
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for phase in args.phases.split(","):
            layers, token_adapter, xs, ys, bufs = make_workload(phase, dtype)
            plan = plan_tokens(token_adapter, ADAPTERS)
            prepared = [{name: (prepare_runs(w.pool, w.runs_a, w.in_features, True),
                                prepare_runs(w.pool, w.runs_b, w.out_sizes, False)) for name, w in mods.items()}
                        for mods in layers]  # fmt: skip
            check_paths_agree(layers, token_adapter, xs, plan, prepared, dtype)
            used = sorted(set(token_adapter.tolist()))
            nbytes = {name: statistics.mean(m[name].bytes_read(used) for m in layers) for name in MODULES}
            flops = sum(statistics.mean(m[name].flops(token_adapter) for m in layers) for name in MODULES)
            for label, isa, nthreads in paths:
                torch.set_num_threads(nthreads)
                if isa:
                    os.environ["SLORA_CPU_ISA"] = isa
                slow = phase == "prefill" and (isa == "scalar" or nthreads == 1)
                passes = 1 if args.quick or slow else (3 if phase == "prefill" else 12)
                run_pass("torch" if isa is None else "native", layers, token_adapter, xs, ys, bufs, prepared, plan)
                samples = [run_pass("torch" if isa is None else "native", layers, token_adapter, xs, ys, bufs,
                                    prepared, plan) for _ in range(passes)]  # fmt: skip
                # Best of the passes per (layer, module), then the mean over layers: filters out the
                # calls another process on the machine delayed (recorded: loadavg_1min).
                per_call = {name: statistics.mean(min(s[li, name] for s in samples) for li in range(LAYERS))
                            for name in MODULES}  # fmt: skip
                layer_s = sum(per_call.values())
                row = {
                    "dtype": dtype_name, "phase": phase, "tokens": PHASES[phase][0], "adapters_used": len(used),
                    "path": label, "threads": nthreads,
                    "us_per_call": {name: per_call[name] * 1e6 for name in MODULES},
                    "us_per_layer": layer_s * 1e6,
                    "bytes_per_layer": sum(nbytes.values()),
                    "gb_s": sum(nbytes.values()) / layer_s / 1e9,
                    "gb_s_per_call": {name: nbytes[name] / per_call[name] / 1e9 for name in MODULES},
                }  # fmt: skip
                row["gflop_s"] = flops / layer_s / 1e9
                row["loadavg_1min"] = float(open("/proc/loadavg").read().split()[0])  # other work on the machine
                row["fraction_of_read_bw"] = row["gb_s"] / bw[nthreads]
                rows.append(row)
                print(f"{dtype_name:9s} {phase:8s} {label:15s} {nthreads} thr  "
                      + "  ".join(f"{n.split('_')[0]:>6s} {v:7.1f}us" for n, v in row["us_per_call"].items())
                      + f"  | layer {row['us_per_layer']:8.1f} us  {row['gb_s']:6.2f} GB/s {row['gflop_s']:6.1f} GFLOP/s"
                      f"  ({100 * row['fraction_of_read_bw']:.0f}% of read bw)  load {row['loadavg_1min']:.1f}", flush=True)  # fmt: skip
            os.environ.pop("SLORA_CPU_ISA", None)
            torch.set_num_threads(threads)
            del layers, prepared

    if args.quick:
        return
    out_dir = REPO / "benchmarks" / "results"
    stem = out_dir / f"cpu_native_kernel-{datetime.date.today():%Y%m%d}-cpu-{os.cpu_count()}c"
    result = {
        "machine": machine,
        "config": {"model": "SmolLM2-135M", "layers": LAYERS, "modules": {k: [v[0], list(v[1])] for k, v in MODULES.items()},
                   "adapters": ADAPTERS, "ranks": list(RANKS), "phases": {k: list(v) for k, v in PHASES.items()},
                   "page_elems": PAGE_ELEMS},  # fmt: skip
        "read_bandwidth_gb_s": {str(k): v for k, v in bw.items()},
        "goal": "LoRA read rate >= 60% of the measured read bandwidth",
        "rows": rows,
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(rows, bw, threads, stem.with_suffix(".png"), machine)
    print(f"# wrote {stem}.json and .png")


def plot(rows, bw, threads, path, machine) -> None:
    """Decode (memory-bound): GB/s against the read bandwidth; prefill (compute-bound): GFLOP/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dtype"], r["phase"]) for r in rows}, key=lambda g: (g[1], g[0]))
    labels = list(dict.fromkeys(f"{r['path']} ({r['threads']}t)" for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4.8), squeeze=False)
    for ax, (dtype, phase) in zip(axes[0], groups):
        key = "gb_s" if phase == "decode" else "gflop_s"
        vals = {f"{r['path']} ({r['threads']}t)": r[key] for r in rows if (r["dtype"], r["phase"]) == (dtype, phase)}
        ax.bar(range(len(labels)), [vals.get(lbl, 0) for lbl in labels],
               color=["tab:blue" if lbl.startswith("native") else "tab:orange" for lbl in labels])  # fmt: skip
        if phase == "decode":
            for (n, v), style in zip(sorted(bw.items()), ("--", "-.")):
                ax.axhline(v, color="k", ls=style, lw=1, label=f"read bw {n}t ({v:.1f} GB/s)")
                ax.axhline(0.6 * v, color="tab:red", ls=style, lw=0.8, label=f"60% of read bw {n}t")
            ax.set_ylabel("adapter bytes read / time (GB/s)")
            ax.legend(fontsize=7)
        else:
            ax.set_ylabel("GFLOP/s (compute-bound)")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{phase}, {dtype}")
    fig.suptitle(f"Paged LoRA shrink+expand per layer, SmolLM2-135M shapes, 32 adapters: {machine['cpu_model']}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
