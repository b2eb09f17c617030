"""Throughput of vllm-slora's unified paging vs the base model and stock vLLM LoRA.

Workload (issue: unified paging benchmark): SmolLM2-135M-Instruct, 64 requests x 32
output tokens (greedy, ignore EOS), adapters of ranks {8, 16, 32, 64} on all 7
projections, uniform popularity (request i uses adapter i mod N), every adapter warmed
once before timing; plus the tiny random Llama (tests/tiny_model.py) with 64 adapters
and 128 requests, where adapters weigh most against the base. Systems, each in its own
process, measured in the same run:

* base          - no LoRA at all (the ceiling), as stock vLLM runs it on CPU: compiled
* base-eager    - the same without compilation (vLLM's CPU platform runs every stock
                  LoRA engine eagerly, so this is stock's ceiling)
* stock         - vLLM's LoRA path, --max-loras 8 (fixed padded slots), eager
* slora-torch   - vllm-slora with kernel_backend=torch (per-adapter torch matmuls), eager
* slora-native  - vllm-slora with the native C++ kernel (the CPU default), eager
* slora-native-compiled - the same, compiled as the plugin runs by default

    .venv/bin/python benchmarks/bench_unified_paging.py [--adapters 32 128] [--skip-stock] [--skip-tiny]

Prints a table and writes benchmarks/results/unified_paging-<date>-<machine>.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NUM_REQUESTS = 64
OUTPUT_TOKENS = 32
RANKS = (8, 16, 32, 64)
PROMPT = "Write a short story about a robot who learns to paint."


SYSTEMS = ("base", "base-eager", "stock", "slora-torch", "slora-native", "slora-native-compiled")
TINY_REQUESTS = 128


def bench_model(model_name: str) -> Path:
    from vllm_slora.model_prep import cache_root, prepare_default_model

    if model_name == "smollm2":
        return prepare_default_model()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_model import build_tiny_llama

    target = cache_root() / "models" / "tiny-llama-bench"
    return target if (target / "config.json").exists() else build_tiny_llama(target)


def run_system(system: str, num_adapters: int, model_name: str = "smollm2") -> dict:
    """Measure one system in this process (called in a child process)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from vllm_slora.adapters.generate import generate_adapters
    from vllm_slora.model_prep import cache_root

    model = bench_model(model_name)
    num_requests = NUM_REQUESTS if model_name == "smollm2" else TINY_REQUESTS
    kwargs = dict(model=str(model), dtype="float32", max_model_len=512, gpu_memory_utilization=0.3, seed=0)
    loras: list = [None] * num_requests
    kwargs.update(enforce_eager=not system.endswith("compiled") and system != "base")
    if not system.startswith("base"):
        adapters = generate_adapters(
            model / "config.json", cache_root() / "adapters" / f"bench-{model_name}", num_adapters, ranks=RANKS,
            seed=0,
        )
        kwargs.update(enable_lora=True, max_lora_rank=max(RANKS))
        if system == "stock":
            kwargs.update(max_loras=8, max_cpu_loras=num_adapters)
        else:
            backend = system.split("-")[1]  # torch / native
            kwargs.update(additional_config={"slora": {"kernel_backend": backend}})
        requests = [LoRARequest(a.name, i + 1, a.path) for i, a in enumerate(adapters)]
        loras = [requests[i % num_adapters] for i in range(num_requests)]

    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - t0
    if not system.startswith("base"):  # warm: every adapter loaded once before timing
        llm.generate([PROMPT] * num_adapters, SamplingParams(max_tokens=1), lora_request=requests, use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([PROMPT] * num_requests, params, lora_request=loras, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "model": model_name, "num_requests": num_requests,
        "system": system, "num_adapters": num_adapters if not system.startswith("base") else 0,
        "output_tokens": tokens, "elapsed_s": elapsed, "tok_s": tokens / elapsed, "startup_s": startup_s,
        "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
    }


def measure_in_child(system: str, num_adapters: int, model_name: str) -> dict:
    cmd = [sys.executable, __file__, "--child", system, str(num_adapters), model_name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
    return {"model": model_name, "system": system, "num_adapters": num_adapters,
            "error": f"exit {proc.returncode}: {tail}"}


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"base": "tab:gray", "base-eager": "silver", "stock": "tab:red", "slora-torch": "lightsteelblue",
              "slora-native": "tab:blue", "slora-native-compiled": "navy"}
    models = [m for m in ("smollm2", "tiny") if any(p.get("model") == m and "tok_s" in p for p in points)]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models) + 2, 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        ok = [p for p in points if p.get("model") == model and "tok_s" in p]
        labels = [p["system"] if p["system"].startswith("base") else f"{p['system']}\n{p['num_adapters']} ad."
                  for p in ok]
        ax.bar(range(len(ok)), [p["tok_s"] for p in ok], color=[colors[p["system"]] for p in ok])
        ax.set_xticks(range(len(ok)), labels, rotation=60, ha="right", fontsize=7)
        for i, p in enumerate(ok):
            ratio = p.get("ratio_to_base_eager")
            ax.text(i, p["tok_s"], f"{p['tok_s']:.0f}" + (f"\n{ratio:.2f}x" if ratio else ""), ha="center",
                    va="bottom", fontsize=7)
        ax.set_ylabel("output tokens / s")
        name = "SmolLM2-135M" if model == "smollm2" else "tiny Llama"
        ax.set_title(f"{name}, {ok[0]['num_requests']} req x {OUTPUT_TOKENS} tok (ratio: x base-eager)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("SYSTEM", "N", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_system(args.child[0], int(args.child[1]), args.child[2])), flush=True)
        return 0

    from vllm_slora.bench.machine import machine_info, machine_tag

    systems = [s for s in args.systems if not (args.skip_stock and s == "stock")]
    plan = []
    for system in systems:
        if system.startswith("base"):
            plan.append((system, 0, "smollm2"))
        elif system == "stock":
            plan.append((system, args.adapters[0], "smollm2"))
        else:
            plan += [(system, n, "smollm2") for n in args.adapters]
    if not args.skip_tiny:
        plan += [("base-eager", 0, "tiny")] + [(s, 64, "tiny") for s in systems if s.startswith("slora")]
    points = []
    for system, n, model in plan:
        print(f"[bench] {model}: {system} ({n} adapters)...", flush=True)
        points.append(measure_in_child(system, n, model))
        print("   ", json.dumps(points[-1]), flush=True)

    for model in ("smollm2", "tiny"):
        mine = [p for p in points if p.get("model") == model and "tok_s" in p]
        base = next((p["tok_s"] for p in mine if p["system"] == "base"), None)
        eager = next((p["tok_s"] for p in mine if p["system"] == "base-eager"), None)
        stock = next((p["tok_s"] for p in mine if p["system"] == "stock"), None)
        for p in mine:
            if base:
                p["ratio_to_base"] = p["tok_s"] / base
            if eager:
                p["ratio_to_base_eager"] = p["tok_s"] / eager
            if p["system"].startswith("slora") and stock:
                p["ratio_to_stock"] = p["tok_s"] / stock
    machine = machine_info()
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    stem = RESULTS / f"unified_paging-{stamp}-{machine_tag(machine)}"
    RESULTS.mkdir(exist_ok=True)
    config = {"models": {"smollm2": {"name": "SmolLM2-135M-Instruct", "num_requests": NUM_REQUESTS},
                         "tiny": {"name": "tiny random Llama (tests/tiny_model.py)", "num_requests": TINY_REQUESTS}},
              "output_tokens": OUTPUT_TOKENS, "ranks": RANKS, "popularity": "uniform", "stock_max_loras": 8,
              "dtype": "float32"}
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "config": config, "points": points}, indent=2))
    plot(points, stem.with_suffix(".png"))
    nan = float("nan")
    print(f"\n{'model':<8}{'system':<23}{'adapters':>9}{'tok/s':>9}{'x base':>8}{'x eager':>9}{'x stock':>9}")
    for p in points:
        head = f"{p.get('model', ''):<8}{p['system']:<23}{p['num_adapters']:>9}"
        if "tok_s" in p:
            print(f"{head}{p['tok_s']:>9.1f}{p.get('ratio_to_base', nan):>8.2f}"
                  f"{p.get('ratio_to_base_eager', nan):>9.2f}{p.get('ratio_to_stock', nan):>9.2f}")
        else:
            print(f"{head}  FAILED: {p['error'][:200]}")
    print(f"saved {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
