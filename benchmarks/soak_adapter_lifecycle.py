"""Soak: N load -> request -> unload cycles through `vllm serve`; memory and pool must return.

Issue #9's bar: after 10,000 cycles, EngineCore (which holds the worker at TP=1) and the
API server stay within 5 % of their resident memory at the start, and the pool is back
at its baseline (no adapter blocks, no resident or registered adapters left). Stock vLLM
runs the same cycles in the same run as the baseline (its unload never reaches the
engine, so it is expected to grow).

    .venv/bin/python benchmarks/soak_adapter_lifecycle.py --cycles 10000 --stock-cycles 2000

Writes benchmarks/results/soak_adapter_lifecycle-<date>-<machine>.json and .png.
Uses the tiny test Llama (tests/tiny_model.py): the subject is bookkeeping, not compute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_model import build_tiny_llama  # noqa: E402
from vllm_slora.adapters.generate import generate_adapters  # noqa: E402
from vllm_slora.bench.machine import machine_info, machine_tag  # noqa: E402
from vllm_slora.bench.server_metrics import parse_prometheus_text  # noqa: E402
from vllm_slora.server_process import ServerProcess  # noqa: E402

POOL_SERIES = (
    "vllm_slora:pool_blocks", "vllm_slora:adapters_resident", "vllm_slora:adapters_registered",
    "vllm_slora:host_cache_entries", "vllm_slora:host_cache_bytes", "vllm_slora:adapter_loads_total",
)


def post(base_url: str, path: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(f"{base_url}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def engine_processes(server: ServerProcess) -> dict:
    """psutil processes of the server's tree, by role (API server, EngineCore, workers)."""
    import psutil

    root = psutil.Process(server.process.pid)
    found = {"api_server": root}
    for child in root.children(recursive=True):
        name = " ".join(child.cmdline()) + " " + child.name()
        if "EngineCore" in name:
            found["engine_core"] = child
        elif "Worker" in name:
            found.setdefault("workers", []).append(child)
    return found


def rss_mib(processes: dict) -> dict[str, float]:
    out = {}
    for role, proc in processes.items():
        procs = proc if isinstance(proc, list) else [proc]
        for i, p in enumerate(procs):
            out[role if len(procs) == 1 else f"{role}{i}"] = round(p.memory_info().rss / 2**20, 1)
    return out


def pool_figures(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as resp:
        series = parse_prometheus_text(resp.read().decode())
    out = {}
    for name in POOL_SERIES:
        for labels, value in series.get(name, []):
            kind = [part.split("=")[1].strip('"') for part in labels.strip("{}").split(",")
                    if part.startswith(("kind=", "state="))]
            out[name.split(":")[1] + (f"[{kind[0]}]" if kind else "")] = value
    return out


def soak(system: str, model: Path, adapter_dirs: list[Path], cycles: int, warmup: int, sample_every: int,
         log_dir: Path) -> dict:
    args = ["--enable-lora", "--max-lora-rank", "16", "--max-model-len", "256", "--dtype", "float32",
            "--kv-cache-memory-bytes", str(256 << 20), "--enforce-eager", "--max-num-seqs", "8"]
    if system == "slora":
        args += ["--additional-config", json.dumps({"slora": {}})]
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    samples, errors = [], []
    with ServerProcess(model, args, env=env, log_path=log_dir / f"soak-{system}.log") as server:
        processes = engine_processes(server)
        started = time.perf_counter()
        for i in range(warmup + cycles):
            name = f"soak-{i}"
            status, text = post(server.base_url, "/v1/load_lora_adapter",
                                {"lora_name": name, "lora_path": str(adapter_dirs[i % len(adapter_dirs)])})
            if status == 200:
                status, text = post(server.base_url, "/v1/completions",
                                    {"model": name, "prompt": "the quick brown fox", "max_tokens": 1})
            if status == 200:
                status, text = post(server.base_url, "/v1/unload_lora_adapter", {"lora_name": name})
            if status != 200:
                errors.append({"cycle": i, "status": status, "body": text[:300]})
            done = i + 1 - warmup
            if done >= 0 and (done % sample_every == 0 or done == cycles):
                sample = {"cycle": done, "elapsed_s": round(time.perf_counter() - started, 1),
                          "rss_mib": rss_mib(processes)}
                if system == "slora":
                    # Stats are sent with engine steps: one base request makes the step
                    # that reports the state after the last unload.
                    post(server.base_url, "/v1/completions", {"model": str(model), "prompt": "a", "max_tokens": 1})
                    sample["pool"] = pool_figures(server.base_url)
                samples.append(sample)
                print(f"[{system}] cycle {done}/{cycles}: {sample['rss_mib']} {sample.get('pool', '')}", flush=True)
    first, last = samples[0], samples[-1]
    growth = {role: round(100 * (last["rss_mib"][role] - mib) / mib, 2) for role, mib in first["rss_mib"].items()}
    return {"system": system, "cycles": cycles, "warmup_cycles": warmup, "errors": len(errors),
            "first_errors": errors[:5], "rss_growth_percent": growth, "samples": samples,
            "seconds_per_cycle": round(last["elapsed_s"] / (warmup + cycles), 4)}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for result in results:
        for role in result["samples"][0]["rss_mib"]:
            xs = [s["cycle"] for s in result["samples"]]
            ys = [s["rss_mib"][role] for s in result["samples"]]
            ax.plot(xs, ys, marker=".", label=f"{result['system']} {role}")
    ax.set_xlabel("load -> request -> unload cycles (after warm-up)")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("Adapter lifecycle soak: process memory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--stock-cycles", type=int, default=2_000, help="0 skips the stock baseline")
    parser.add_argument("--warmup", type=int, default=200, help="cycles before the first memory sample")
    parser.add_argument("--sample-every", type=int, default=500)
    parser.add_argument("--adapter-dirs", type=int, default=64, help="distinct adapter directories cycled over")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/vllm-slora-soak"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    for name in ("cycles", "warmup", "sample_every", "adapter_dirs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    model = build_tiny_llama(args.work_dir / "tiny-llama")
    adapter_dirs = [a.path for a in generate_adapters(model / "config.json", args.work_dir / "adapters",
                                                      args.adapter_dirs, ranks=(4, 8, 16), seed=5)]
    results = [soak("slora", model, adapter_dirs, args.cycles, args.warmup, args.sample_every, args.work_dir)]
    if args.stock_cycles:
        results.append(soak("stock", model, adapter_dirs, args.stock_cycles, args.warmup,
                            min(args.sample_every, args.stock_cycles), args.work_dir))
    slora = results[0]
    first_pool, last_pool = slora["samples"][0].get("pool", {}), slora["samples"][-1].get("pool", {})
    verdict = {
        "memory_within_5_percent": all(abs(g) <= 5 for g in slora["rss_growth_percent"].values()),
        "pool_back_at_baseline": all(last_pool.get(k) == first_pool.get(k) for k in
                                     ("pool_blocks[adapter_pinned]", "pool_blocks[adapter_cached]",
                                      "adapters_resident[pinned]", "adapters_resident[cached]",
                                      "adapters_registered", "host_cache_entries")),
        "no_errors": slora["errors"] == 0,
    }
    machine = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"soak_adapter_lifecycle-{time.strftime('%Y%m%d')}-{machine_tag(machine)}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "config": {k: str(v) for k, v in vars(args).items()}, "verdict": verdict,
         "results": results}, indent=1))
    plot(results, stem.with_suffix(".png"))
    print(json.dumps({"verdict": verdict, **{r["system"]: r["rss_growth_percent"] for r in results}}, indent=1))
    print(f"wrote {stem}.json and .png")
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
