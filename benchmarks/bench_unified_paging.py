"""Throughput of vllm-slora's unified paging vs the base model and stock vLLM LoRA.

Workload (issue: unified paging benchmark): SmolLM2-135M-Instruct, 64 requests x 32
output tokens (greedy, ignore EOS), adapters of ranks {8, 16, 32, 64} on all 7
projections, uniform popularity (request i uses adapter i mod N), every adapter warmed
once before timing. Systems, each in its own process, measured in the same run:

* base      - no LoRA at all (the ceiling), as stock vLLM runs it on CPU: torch.compile'd
* base-eager - the same without compilation: vLLM's CPU platform turns compilation off
              for any engine with LoRA (stock or slora), so this is the ceiling for both
* stock     - vLLM's LoRA path, --max-loras 8 (fixed padded slots)
* slora     - vllm-slora (--additional-config '{"slora": {}}')

    .venv/bin/python benchmarks/bench_unified_paging.py [--adapters 32 128] [--skip-stock]

Prints a table and writes benchmarks/results/unified_paging-<date>-<machine>.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NUM_REQUESTS = 64
OUTPUT_TOKENS = 32
RANKS = (8, 16, 32, 64)
PROMPT = "Write a short story about a robot who learns to paint."


def run_system(system: str, num_adapters: int) -> dict:
    """Measure one system in this process (called in a child process)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from vllm_slora.adapters.generate import generate_adapters
    from vllm_slora.model_prep import cache_root, prepare_default_model

    model = prepare_default_model()
    kwargs = dict(model=str(model), dtype="float32", max_model_len=512, gpu_memory_utilization=0.3, seed=0)
    loras: list = [None] * NUM_REQUESTS
    if system == "base-eager":
        kwargs.update(enforce_eager=True)
    if not system.startswith("base"):
        adapters = generate_adapters(
            model / "config.json", cache_root() / "adapters" / "bench", num_adapters, ranks=RANKS, seed=0
        )
        kwargs.update(enable_lora=True, max_lora_rank=max(RANKS))
        if system == "stock":
            kwargs.update(max_loras=8, max_cpu_loras=num_adapters)
        else:
            kwargs.update(additional_config={"slora": {}})
        requests = [LoRARequest(a.name, i + 1, a.path) for i, a in enumerate(adapters)]
        loras = [requests[i % num_adapters] for i in range(NUM_REQUESTS)]

    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - t0
    if not system.startswith("base"):  # warm: every adapter loaded once before timing
        llm.generate([PROMPT] * num_adapters, SamplingParams(max_tokens=1), lora_request=requests, use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([PROMPT] * NUM_REQUESTS, params, lora_request=loras, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "system": system, "num_adapters": num_adapters if not system.startswith("base") else 0,
        "output_tokens": tokens, "elapsed_s": elapsed, "tok_s": tokens / elapsed, "startup_s": startup_s,
        "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
    }


def measure_in_child(system: str, num_adapters: int) -> dict:
    cmd = [sys.executable, __file__, "--child", system, str(num_adapters)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
    return {"system": system, "num_adapters": num_adapters, "error": f"exit {proc.returncode}: {tail}"}


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [p for p in points if "tok_s" in p]
    labels = [p["system"] if p["system"].startswith("base") else f"{p['system']}\n{p['num_adapters']} adapters"
              for p in ok]
    colors = {"base": "tab:gray", "base-eager": "silver", "stock": "tab:red", "slora": "tab:blue"}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(labels, [p["tok_s"] for p in ok], color=[colors[p["system"]] for p in ok])
    for i, p in enumerate(ok):
        ax.text(i, p["tok_s"], f"{p['tok_s']:.1f}", ha="center", va="bottom")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"SmolLM2-135M, {NUM_REQUESTS} req x {OUTPUT_TOKENS} tok, ranks {'/'.join(map(str, RANKS))}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_system(args.child[0], int(args.child[1]))), flush=True)
        return 0

    from vllm_slora.bench.machine import machine_info, machine_tag

    plan = [("base", 0), ("base-eager", 0)] + [("slora", n) for n in args.adapters]
    if not args.skip_stock:
        plan.insert(2, ("stock", args.adapters[0]))
    points = []
    for system, n in plan:
        print(f"[bench] {system} ({n} adapters)...", flush=True)
        points.append(measure_in_child(system, n))
        print("   ", json.dumps(points[-1]), flush=True)

    base = next((p["tok_s"] for p in points if p["system"] == "base" and "tok_s" in p), None)
    eager = next((p["tok_s"] for p in points if p["system"] == "base-eager" and "tok_s" in p), None)
    stock = {p["num_adapters"]: p["tok_s"] for p in points if p["system"] == "stock" and "tok_s" in p}
    for p in points:
        if "tok_s" in p and base:
            p["ratio_to_base"] = p["tok_s"] / base
            if eager:
                p["ratio_to_base_eager"] = p["tok_s"] / eager
            if p["system"] == "slora" and stock:
                p["ratio_to_stock"] = p["tok_s"] / next(iter(stock.values()))
    machine = machine_info()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d")
    stem = RESULTS / f"unified_paging-{stamp}-{machine_tag(machine)}"
    RESULTS.mkdir(exist_ok=True)
    config = {"model": "SmolLM2-135M-Instruct", "num_requests": NUM_REQUESTS, "output_tokens": OUTPUT_TOKENS,
              "ranks": RANKS, "popularity": "uniform", "stock_max_loras": 8, "dtype": "float32"}
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "config": config, "points": points}, indent=2))
    plot(points, stem.with_suffix(".png"))
    print(f"\n{'system':<11}{'adapters':>9}{'tok/s':>9}{'x base':>8}{'x eager':>9}{'x stock':>9}")
    for p in points:
        if "tok_s" in p:
            print(f"{p['system']:<11}{p['num_adapters']:>9}{p['tok_s']:>9.1f}{p.get('ratio_to_base', 0):>8.2f}"
                  f"{p.get('ratio_to_base_eager', float('nan')):>9.2f}{p.get('ratio_to_stock', float('nan')):>9.2f}")
        else:
            print(f"{p['system']:<11}{p['num_adapters']:>9}  FAILED: {p['error'][:200]}")
    print(f"saved {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
