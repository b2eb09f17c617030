"""`vllm-slora bench`: S-LoRA-style sweep of base vs stock vLLM LoRA vs vllm-slora.

The defaults are sized for a 2-core CPU and the embedded SmolLM2-135M (budget: 3 server
starts of ~50 s, base ~45 s, and at most 100 s per LoRA point, about 13 minutes): 64
requests x 32 output tokens at 2 req/s, for 1, 8 and 32 adapters of ranks 8-64. Stock
vLLM LoRA on CPU decodes far slower than the base model, so each point has a deadline;
requests still unfinished then are counted as errors (their streamed tokens still count
towards tok/s), not waited for.

Importing this module is cheap (the `vllm-slora` parser imports it for every command);
the heavy imports happen in `run_bench`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to compare")
    g.add_argument("--model", help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--systems", type=_str_list, default=["base", "stock", "slora"],
                   help="comma-separated subset of base,stock,slora (default: all three)")
    g.add_argument("--offline", action="store_true",
                   help="measure through vllm.LLM (closed batch, no arrival times) instead of a server")

    g = parser.add_argument_group("workload (S-LoRA §7)")
    g.add_argument("--num-adapters", type=_int_list, default=[1, 8, 32], help="sweep, e.g. 1,8,32,128")
    g.add_argument("--rates", type=_float_list, default=[2.0], help="request rates (req/s) to sweep")
    g.add_argument("--num-requests", type=int, default=64, help="requests per point")
    g.add_argument("--prompt-len", default="16:64", help="prompt words: fixed N or uniform LOW:HIGH")
    g.add_argument("--output-len", default="32", help="output tokens: fixed N or uniform LOW:HIGH")
    g.add_argument("--alpha", type=float, default=1.0, help="popularity power law (1 = uniform, <1 skewed)")
    g.add_argument("--cv", type=float, default=1.0, help="inter-arrival CV (1 = Poisson, >1 burstier)")
    g.add_argument("--ranks", type=_int_list, default=[8, 16, 32, 64], help="adapter rank mix (cycled)")
    g.add_argument("--target-modules", type=_str_list, default=None,
                   help="LoRA target modules (default: the adapter generator's, all projections)")
    g.add_argument("--base-fraction", type=float, default=0.0, help="share of requests without adapter")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--trace", help="replay this JSONL trace (from a previous run) instead of generating")

    g = parser.add_argument_group("servers")
    g.add_argument("--max-loras", type=int, default=8, help="stock vLLM's GPU/CPU LoRA slots per batch")
    g.add_argument("--max-cpu-loras", type=int, default=None,
                   help="stock vLLM's host cache (default: every adapter)")
    g.add_argument("--dtype", default=None, help="model dtype (default: float32 on CPU, auto with CUDA)")
    g.add_argument("--compile", action="store_true",
                   help="let vLLM torch.compile the model (default on CPU: --enforce-eager, faster start)")
    g.add_argument("--max-model-len", type=int, default=512)
    g.add_argument("--kv-cache-memory-bytes", type=int, default=512 * 1024 * 1024)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--server-args", default="", help="extra `vllm serve` arguments for every system (one string)")
    g.add_argument("--slora-config", default="{}", help="JSON for additional_config['slora']")
    g.add_argument("--slora-server-args", default="", help="extra `vllm serve` arguments for slora only")
    g.add_argument("--fresh-server-per-point", action="store_true",
                   help="restart the server for every point (default: one server per system)")

    g = parser.add_argument_group("measurement and output")
    g.add_argument("--deadline", type=float, default=100.0,
                   help="seconds per point; unfinished requests then count as errors (0 = none)")
    g.add_argument("--slo-ttft", type=float, default=6.0, help="TTFT SLO in seconds (S-LoRA: 6)")
    g.add_argument("--out-dir", default="benchmarks/results")
    g.add_argument("--adapters-dir", help="where generated adapters live (default: under the vllm-slora cache)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no per-request progress bars")


def _resolve_model(args) -> Path:
    if args.model:
        return Path(args.model)
    from vllm_slora.model_prep import prepare_default_model

    return prepare_default_model()  # idempotent: returns at once when already built


def _adapters(args, model: Path, count: int):
    from vllm_slora.adapters.generate import generate_adapters
    from vllm_slora.bench.systems import AdapterRef
    from vllm_slora.model_prep import cache_root

    out = Path(args.adapters_dir) if args.adapters_dir else cache_root() / "bench-adapters" / model.name
    kwargs = {"target_modules": tuple(args.target_modules)} if args.target_modules else {}
    generated = generate_adapters(model, out, count, ranks=tuple(args.ranks), seed=args.seed, **kwargs)
    return [AdapterRef(a.name, str(a.path), a.rank) for a in generated]


def run_bench(args) -> int:
    from vllm_slora.bench.machine import machine_info
    from vllm_slora.bench.results import result_stem, write_results
    from vllm_slora.bench.runner import Point, RunOptions
    from vllm_slora.bench.sweep import SweepConfig, run_sweep
    from vllm_slora.bench.systems import SYSTEMS, ServerSettings
    from vllm_slora.bench.workload import LengthRange, WorkloadSpec, load_trace, without_adapters

    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        print(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    machine = machine_info()
    stem = result_stem(args.out_dir, machine)
    model = _resolve_model(args)
    workload = WorkloadSpec(
        num_requests=args.num_requests, cv=args.cv, alpha=args.alpha,
        prompt_len=LengthRange.parse(args.prompt_len), output_len=LengthRange.parse(args.output_len),
        base_fraction=args.base_fraction, ranks=tuple(args.ranks), seed=args.seed,
    )
    replayed = load_trace(args.trace) if args.trace else None
    if replayed:
        # A saved trace names adapters "adapter-NNNN"; generate up to the highest index.
        used = {r.adapter for r in replayed if r.adapter}
        count = 1 + max((int(name.rsplit("-", 1)[1]) for name in used), default=-1)
        adapter_counts = [len(used)]
    else:
        count = max(args.num_adapters)
        adapter_counts = args.num_adapters
    adapters = _adapters(args, model, count) if count and set(args.systems) - {"base"} else []

    config = SweepConfig(
        model=model, adapters=adapters, systems=args.systems, adapter_counts=adapter_counts,
        request_rates=args.rates, workload=workload,
        settings=ServerSettings(
            dtype=args.dtype or ("auto" if machine["gpus"] else "float32"),
            enforce_eager=not (args.compile or machine["gpus"]), max_model_len=args.max_model_len, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            max_num_seqs=args.max_num_seqs, extra_args=tuple(shlex.split(args.server_args)),
            max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
            slora_config=json.loads(args.slora_config), slora_extra_args=tuple(shlex.split(args.slora_server_args)),
        ),
        options=RunOptions(deadline_s=args.deadline or None, ttft_slo_s=args.slo_ttft,
                           log_dir=Path(args.out_dir) / "logs" / stem.name, progress=not args.quiet),
        trace_dir=Path(args.out_dir) / "traces" / stem.name,
        offline=args.offline, fresh_server_per_point=args.fresh_server_per_point,
    )

    points_by_system = None
    if replayed:
        span = max(r.arrival_s for r in replayed)
        labels = {"num_adapters": len(used), "request_rate": round(len(replayed) / span, 3) if span else 0.0}
        lora_point = Point(labels, replayed, args.trace)
        base_point = Point({**labels, "num_adapters": 0}, without_adapters(replayed), args.trace)
        points_by_system = {s: [base_point if s == "base" else lora_point] for s in args.systems}

    points = run_sweep(config, points_by_system)
    run_config = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "model": str(model),
        "systems": list(args.systems),
        "num_adapters": adapter_counts,
        "request_rates": list(args.rates),
        "workload": workload.to_dict(),
        "trace": args.trace,
        "server_settings": {k: v for k, v in vars(config.settings).items()},
        "deadline_s": config.options.deadline_s,
        "mode": "offline" if args.offline else "server",
        "server_reuse": not args.fresh_server_per_point,
    }
    files = write_results(points, stem, machine, run_config)
    print(f"results: {files['summary']}")
    if not args.no_plot:
        from vllm_slora.bench.plots import plot_sweep

        subtitle = f"({model.name}, {machine['cpu_cores']} cores)"
        for png in plot_sweep(points, stem, subtitle):
            print(f"plot:    {png}")
    failed = [p for p in points if p["status"] != "ok"]
    for p in failed:
        print(f"FAILED {p['system']} n={p['num_adapters']}: see {p['server']['log']}", file=sys.stderr)
    return 1 if failed else 0
