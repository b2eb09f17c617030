"""S-LoRA-style charts of a sweep: throughput and first-token latency against the number
of adapters (and against the request rate when several rates were run), every system on
the same axes. The base model (no LoRA) is drawn as a dashed reference line.
A point where requests failed is labelled with its error count, so a fast-looking point
that dropped work cannot pass unnoticed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

_STYLE = {"base": dict(color="gray", linestyle="--"), "stock": dict(color="tab:red", marker="s"),
          "slora": dict(color="tab:blue", marker="o")}
_PANELS = (("throughput_tok_s", "throughput (output tok/s)"), ("ttft_p50_s", "TTFT p50 (s)"),
           ("slo_attainment", "SLO attainment (TTFT)"))


def _value(point: dict, key: str) -> float | None:
    summary = point.get("summary")
    if not summary:
        return None
    if key == "ttft_p50_s":
        return summary["ttft_s"]["p50"]
    return summary.get(key)


def _annotate_errors(ax, xs, ys, points) -> None:
    for x, y, point in zip(xs, ys, points):
        errors = point.get("summary", {}).get("errors", 0)
        if errors and y is not None:
            ax.annotate(f"{errors} err", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _plot_against(points: Sequence[dict], x_key: str, x_label: str, title: str, path: Path, log_x: bool) -> Path:
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(5 * len(_PANELS), 4))
    systems = [s for s in ("base", "stock", "slora") if any(p["system"] == s for p in points)]
    systems += sorted({p["system"] for p in points} - set(systems))
    xs_all = sorted({p[x_key] for p in points if p["system"] != "base"})
    for ax, (key, label) in zip(axes, _PANELS):
        for system in systems:
            mine = sorted((p for p in points if p["system"] == system and p.get("summary")), key=lambda p: p[x_key])
            if not mine:
                continue
            style = _STYLE.get(system, {})
            if system == "base" and x_key == "num_adapters":
                # The base model ignores adapters: one measurement, drawn across the axis.
                y = _value(mine[0], key)
                if y is not None and xs_all:
                    ax.plot([xs_all[0], xs_all[-1]], [y, y], label="base (no LoRA)", **style)
                continue
            xs = [p[x_key] for p in mine]
            ys = [_value(p, key) for p in mine]
            ax.plot(xs, ys, label=system, **style)
            _annotate_errors(ax, xs, ys, mine)
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        if log_x and xs_all and xs_all[-1] / max(xs_all[0], 1) >= 8:
            ax.set_xscale("log", base=2)
        if key == "slo_attainment":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(points: Sequence[dict], out_stem: str | Path, subtitle: str = "") -> list[Path]:
    """Write `<stem>-adapters.png` (per request rate) and, with several rates,
    `<stem>-rate.png` (at the largest adapter count). Returns the files written."""
    out_stem = Path(out_stem)
    written = []
    rates = sorted({p["request_rate"] for p in points})
    adapter_counts = sorted({p["num_adapters"] for p in points if p["system"] != "base"})
    for rate in rates:
        at_rate = [p for p in points if p["request_rate"] == rate]
        suffix = "" if len(rates) == 1 else f"-rate{rate:g}"
        if len(adapter_counts) > 1:
            written.append(_plot_against(
                at_rate, "num_adapters", "number of adapters",
                f"vs number of adapters at {rate:g} req/s {subtitle}", Path(f"{out_stem}-adapters{suffix}.png"),
                log_x=True))
    if len(rates) > 1 and adapter_counts:
        n = adapter_counts[-1]
        at_n = [p for p in points if p["system"] == "base" or p["num_adapters"] == n]
        written.append(_plot_against(
            at_n, "request_rate", "request rate (req/s)", f"vs request rate, {n} adapters {subtitle}",
            Path(f"{out_stem}-rate.png"), log_x=False))
    return written
