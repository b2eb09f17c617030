"""Per-request records and the per-run summary computed from them.

Every request of a trace ends as exactly one `RequestRecord`; a failed or timed-out
request keeps its error string and is counted, never dropped.
- req/s counts completed requests only; tok/s counts every token streamed, including
  those of requests cut at the run deadline (a slow system that was cut still did work).
- TTFT is over every request that received a first token; TPOT and end-to-end latency
  over completed requests.
- SLO attainment is over all requests: a request that never got its first token within
  the SLO, failures included, is a miss (S-LoRA counts aborted requests the same way).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

DEFAULT_TTFT_SLO_S = 6.0  # S-LoRA's first-token SLO


@dataclass
class RequestRecord:
    id: str
    adapter: str | None
    scheduled_s: float  # the trace's arrival offset
    sent_s: float | None = None  # when the client actually sent it (same clock as below)
    first_token_s: float | None = None
    finished_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished_s is not None

    @property
    def ttft_s(self) -> float | None:
        if self.sent_s is None or self.first_token_s is None:
            return None
        return self.first_token_s - self.sent_s

    @property
    def latency_s(self) -> float | None:
        if self.sent_s is None or self.finished_s is None:
            return None
        return self.finished_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with fewer than 2 tokens."""
        if self.first_token_s is None or self.finished_s is None or self.output_tokens < 2:
            return None
        return (self.finished_s - self.first_token_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "latency_s": self.latency_s}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _stats(values: list[float]) -> dict:
    return {
        "mean": sum(values) / len(values) if values else None,
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
    }


def summarize(
    records: Iterable[RequestRecord],
    wall_s: float,
    ttft_slo_s: float = DEFAULT_TTFT_SLO_S,
) -> dict:
    """Throughput, latency percentiles, SLO attainment and error counts of one run.

    `wall_s` is the whole run, from the first scheduled arrival to the last completion
    (drain included), as in S-LoRA's throughput.
    """
    records = list(records)
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    error_kinds: dict[str, int] = {}
    for r in failed:
        kind = (r.error or "unfinished").split(":", 1)[0]
        error_kinds[kind] = error_kinds.get(kind, 0) + 1
    within_slo = sum(1 for r in records if r.ttft_s is not None and r.ttft_s <= ttft_slo_s)
    output_tokens = sum(r.output_tokens for r in records)
    wall_s = max(wall_s, 1e-9)
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": len(failed),
        "error_kinds": error_kinds,
        "error_examples": [f"{r.id}: {r.error}" for r in failed[:3]],
        "wall_s": wall_s,
        "throughput_req_s": len(ok) / wall_s,
        "throughput_tok_s": output_tokens / wall_s,
        "output_tokens": output_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "ttft_s": _stats([r.ttft_s for r in records if r.ttft_s is not None]),
        "tpot_s": _stats([r.tpot_s for r in ok if r.tpot_s is not None]),
        "latency_s": _stats([r.latency_s for r in ok if r.latency_s is not None]),
        "ttft_slo_s": ttft_slo_s,
        "slo_attainment": within_slo / len(records) if records else None,
        "adapters_requested": len({r.adapter for r in records if r.adapter is not None}),
        "adapters_touched": len({r.adapter for r in ok if r.adapter is not None}),
    }
