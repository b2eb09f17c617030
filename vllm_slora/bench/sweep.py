"""A sweep over systems x number of adapters x request rate, end to end.

Traces are generated once per (number of adapters, rate) and saved, then replayed
unchanged on every system. Because the generator draws arrivals, lengths and prompts
from separate random streams, the traces for different adapter counts differ only in
which adapter each request names; the base-model reference is that same trace with the
adapters removed, measured once per rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from vllm_slora.bench.runner import Point, RunOptions, run_system
from vllm_slora.bench.systems import AdapterRef, ServerSettings
from vllm_slora.bench.workload import (
    WorkloadSpec,
    adapter_names,
    generate_trace,
    save_trace,
    without_adapters,
)


@dataclass
class SweepConfig:
    model: Path
    adapters: list[AdapterRef]  # at least max(adapter_counts); point n uses the first n
    systems: Sequence[str] = ("base", "stock", "slora")
    adapter_counts: Sequence[int] = (1, 8, 32)
    request_rates: Sequence[float] = (2.0,)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    settings: ServerSettings = field(default_factory=ServerSettings)
    options: RunOptions = field(default_factory=RunOptions)
    trace_dir: Path = Path("benchmarks/results/traces")
    offline: bool = False
    fresh_server_per_point: bool = False


def build_points(config: SweepConfig) -> dict[str, list[Point]]:
    """Points per system; base gets one adapter-free point per rate."""
    # Without adapters (a base-only run) placeholder names keep the traces identical.
    names = [a.name for a in config.adapters] or adapter_names(max(config.adapter_counts, default=0))
    config.trace_dir.mkdir(parents=True, exist_ok=True)
    lora_points, base_points = [], []
    for rate in config.request_rates:
        for n in config.adapter_counts:
            spec = dataclasses.replace(config.workload, num_adapters=n, request_rate=rate)
            trace = generate_trace(spec, names[:n])
            path = save_trace(trace, config.trace_dir / f"n{n}-rate{rate:g}.jsonl")
            lora_points.append(Point({"num_adapters": n, "request_rate": rate}, trace, str(path)))
        base_trace = without_adapters(lora_points[-1].trace)
        path = save_trace(base_trace, config.trace_dir / f"base-rate{rate:g}.jsonl")
        base_points.append(Point({"num_adapters": 0, "request_rate": rate}, base_trace, str(path)))
    return {system: base_points if system == "base" else lora_points for system in config.systems}


def _one_line(point: dict) -> str:
    labels = f"{point['system']:>5} n={point['num_adapters']:<4} rate={point['request_rate']:g}"
    if point["status"] != "ok":
        return f"{labels}  {point['status']}, log: {point['server']['log']}"
    s = point["summary"]
    ttft = s["ttft_s"]["p50"]
    return (f"{labels}  {s['throughput_tok_s']:7.1f} tok/s  {s['throughput_req_s']:5.2f} req/s  "
            f"TTFT p50 {ttft if ttft is None else round(ttft, 2)} s  SLO {s['slo_attainment']:.2f}  "
            f"errors {s['errors']}/{s['requests']}")


def run_sweep(config: SweepConfig, points_by_system: dict[str, list[Point]] | None = None) -> list[dict]:
    """Every point's result dict (records included), in run order.

    `points_by_system` replaces the generated traces (e.g. a saved trace replayed as is).
    """
    if config.adapters and len(config.adapters) < max(config.adapter_counts):
        raise ValueError(f"{max(config.adapter_counts)} adapters needed, {len(config.adapters)} given")
    if config.offline:
        from vllm_slora.bench.offline import run_system_offline as run
    else:
        run = run_system
    points_by_system = points_by_system or build_points(config)
    total = sum(len(p) for p in points_by_system.values())
    results: list[dict] = []
    with tqdm(total=total, desc="bench points", unit="point") as bar:
        for system, points in points_by_system.items():
            # The base model needs no adapters; LoRA systems get every adapter the largest
            # point uses (or, with fresh servers, exactly the point's adapters).
            groups = [[p] for p in points] if config.fresh_server_per_point else [points]
            for group in groups:
                n = 0 if system == "base" else max(p.labels["num_adapters"] for p in group)
                for result in run(system, config.model, config.adapters[:n], group, config.settings, config.options):
                    results.append(result)
                    bar.write(_one_line(result))
                    bar.update(1)
    return results
