"""Measure one system: start its server once, replay one or more traces, stop it.

One server per system serves every point of a sweep: all adapters the largest point
needs are registered at start-up, and a point with n adapters simply sends requests to
the first n of them. That saves a 30-45 s CPU start per point; `run_bench
--fresh-server-per-point` restarts instead, for a clean server per point.
A server that fails to start turns its points into failed points carrying the log tail;
the sweep goes on with the other systems.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vllm_slora.bench.metrics import DEFAULT_TTFT_SLO_S, summarize
from vllm_slora.bench.replay import replay_trace
from vllm_slora.bench.server_metrics import MetricsSampler
from vllm_slora.bench.systems import BASE_MODEL_NAME, AdapterRef, ServerSettings, server_args
from vllm_slora.bench.workload import TraceRequest
from vllm_slora.server_process import ServerProcess, ServerStartError


@dataclass
class Point:
    """One measurement: a trace plus the labels it is reported under."""

    labels: dict  # e.g. {"num_adapters": 8, "request_rate": 2.0}
    trace: list[TraceRequest]
    trace_path: str | None = None


@dataclass
class RunOptions:
    deadline_s: float | None = 100.0  # per point; unfinished requests count as errors
    ttft_slo_s: float = DEFAULT_TTFT_SLO_S
    startup_timeout_s: float = 600.0
    log_dir: Path = field(default_factory=lambda: Path("benchmarks/results/logs"))
    warmup: bool = True
    progress: bool = True


def _warm_up(base_url: str) -> None:
    # One short base-model request, so lazy one-time work in the engine (first forward,
    # allocator growth) is not charged to the first measured request. Deliberately no
    # adapter: loading adapters is part of what is measured.
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=0, timeout=120)
    try:
        client.completions.create(model=BASE_MODEL_NAME, prompt="warm up", max_tokens=4)
    finally:
        client.close()


async def _measure(point: Point, base_url: str, options: RunOptions, desc: str | None) -> dict:
    async with MetricsSampler(base_url) as sampler:
        replay = await replay_trace(
            point.trace, base_url, BASE_MODEL_NAME, deadline_s=options.deadline_s, progress_desc=desc
        )
    return {
        "summary": summarize(replay.records, replay.wall_s, options.ttft_slo_s),
        "server_metrics": sampler.summary(),
        "records": [r.to_dict() for r in replay.records],
    }


def run_system(
    system: str,
    model: str | Path,
    adapters: Sequence[AdapterRef],
    points: Sequence[Point],
    settings: ServerSettings,
    options: RunOptions,
) -> list[dict]:
    """One result dict per point, in order: labels, status, summary, server info."""
    args = server_args(system, adapters, settings)
    label = "-".join(f"{v}" for v in points[0].labels.values()) if len(points) == 1 else "all"
    log_path = Path(options.log_dir) / f"{system}-{label}-{time.strftime('%H%M%S')}.log"
    server_info = {"args": args, "log": str(log_path), "registered_adapters": len(adapters)}
    results = []
    t_start = time.monotonic()
    try:
        with ServerProcess(model, args, log_path=log_path, startup_timeout_s=options.startup_timeout_s) as server:
            server_info["startup_s"] = round(time.monotonic() - t_start, 1)
            if options.warmup:
                try:
                    _warm_up(server.base_url)
                except Exception as exc:  # the measured requests will show what is wrong
                    server_info["warmup_error"] = f"{type(exc).__name__}: {exc}"[:500]
            for point in points:
                desc = f"{system} {point.labels}" if options.progress else None
                measured = asyncio.run(_measure(point, server.base_url, options, desc))
                if not server.is_running():
                    measured["server_died"] = server.log_tail(40)
                results.append({"system": system, **point.labels, "status": "ok",
                                "trace": point.trace_path, "server": server_info, **measured})
    except ServerStartError as exc:
        for point in points[len(results):]:
            results.append({"system": system, **point.labels, "status": "server_failed",
                            "trace": point.trace_path, "server": server_info, "error": str(exc)[-4000:]})
    return results
