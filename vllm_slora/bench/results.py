"""Result files: `benchmarks/results/<date>-<machine>.json` (+ requests JSONL, + PNGs).

The JSON is the short record DESIGN.md §8 asks for: machine, configuration, per-point
summaries and the ratios that matter (each LoRA system vs the base model, slora vs stock,
measured in the same run). Per-request records go to a sibling `-requests.jsonl` so the
summary stays readable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from vllm_slora.bench.machine import machine_tag


def result_stem(out_dir: str | Path, machine: dict) -> Path:
    """`<out_dir>/<date>-<machine>`, with the time appended if that name is taken."""
    out_dir = Path(out_dir)
    stem = out_dir / f"{time.strftime('%Y-%m-%d')}-{machine_tag(machine)}"
    if stem.with_suffix(".json").exists():
        stem = out_dir / f"{stem.name}-{time.strftime('%H%M%S')}"
    return stem


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def throughput_ratios(points: Sequence[dict]) -> list[dict]:
    """Per (adapters, rate): output-token throughput of stock and slora vs base, and slora vs stock."""
    def tok_s(system, n, rate):
        for p in points:
            if p["system"] == system and p["request_rate"] == rate and p.get("summary") and (
                system == "base" or p["num_adapters"] == n
            ):
                return p["summary"]["throughput_tok_s"]
        return None

    keys = sorted({(p["num_adapters"], p["request_rate"]) for p in points if p["system"] != "base"})
    rows = []
    for n, rate in keys:
        base, stock, slora = tok_s("base", n, rate), tok_s("stock", n, rate), tok_s("slora", n, rate)
        rows.append({"num_adapters": n, "request_rate": rate, "stock_vs_base": _ratio(stock, base),
                     "slora_vs_base": _ratio(slora, base), "slora_vs_stock": _ratio(slora, stock)})
    return rows


def write_results(points: Sequence[dict], stem: Path, machine: dict, config: dict) -> dict[str, Path]:
    """Write `<stem>.json` and `<stem>-requests.jsonl`; return their paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    summary_path = stem.with_suffix(".json")
    records_path = stem.parent / f"{stem.name}-requests.jsonl"
    document = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "config": config,
        "ratios": throughput_ratios(points),
        "points": [{k: v for k, v in p.items() if k != "records"} for p in points],
        "requests_file": records_path.name,
    }
    summary_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    with open(records_path, "w") as f:
        for p in points:
            for record in p.get("records", []):
                f.write(json.dumps({"system": p["system"], "num_adapters": p["num_adapters"],
                                    "request_rate": p["request_rate"], **record}) + "\n")
    return {"summary": summary_path, "requests": records_path}
