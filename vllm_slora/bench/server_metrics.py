"""Pool usage as the server reports it: samples of vLLM's Prometheus /metrics during a run.

vLLM 0.32 exports the KV pool occupancy as the gauge `vllm:kv_cache_usage_perc` (a
fraction, 1.0 = full; v1/metrics/loggers.py) and queue depths as
`vllm:num_requests_running` / `vllm:num_requests_waiting`. With vllm-slora the KV pool
also holds the resident adapters, so the same gauge is the unified pool's usage. Gauges
are instantaneous, so a background task samples them at a fixed interval.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx

SAMPLED_GAUGES = {
    "vllm:kv_cache_usage_perc": "pool_usage",
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
}
_SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus_text(text: str) -> dict[str, list[tuple[str, float]]]:
    """{metric name: [(label block, value), ...]} for every sample line."""
    samples: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_LINE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        try:
            samples.setdefault(name, []).append((labels or "", float(value)))
        except ValueError:
            continue
    return samples


def gauge_values(text: str) -> dict[str, float]:
    """The sampled gauges, summed over engines (label sets)."""
    parsed = parse_prometheus_text(text)
    return {
        short: sum(value for _, value in parsed[name])
        for name, short in SAMPLED_GAUGES.items()
        if name in parsed
    }


class MetricsSampler:
    """`async with MetricsSampler(base_url) as sampler: ...; sampler.summary()`."""

    def __init__(self, base_url: str, interval_s: float = 0.5):
        self.url = f"{base_url}/metrics"
        self.interval_s = interval_s
        self.samples: list[dict[str, float]] = []
        self.scrape_errors = 0
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> MetricsSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                try:
                    response = await client.get(self.url)
                    response.raise_for_status()
                    self.samples.append({"t": time.monotonic(), **gauge_values(response.text)})
                except (httpx.HTTPError, OSError):
                    self.scrape_errors += 1
                await asyncio.sleep(self.interval_s)

    def summary(self) -> dict:
        result: dict = {"samples": len(self.samples), "scrape_errors": self.scrape_errors}
        for short in SAMPLED_GAUGES.values():
            values = [s[short] for s in self.samples if short in s]
            if values:
                result[short] = {"mean": sum(values) / len(values), "max": max(values)}
        return result
