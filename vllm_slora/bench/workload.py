"""Synthetic multi-adapter workloads in the style of the S-LoRA paper (§7), as replayable traces.

A `WorkloadSpec` plus a seed fully determines a trace: every request's arrival time, target
adapter, prompt and output length. The trace is written as JSONL (one request per line)
so that exactly the same requests replay against stock vLLM, vLLM + vllm-slora and the
base model.

- Arrivals: Gamma inter-arrival times with mean 1/rate and coefficient of variation `cv`
  (cv = 1 is a Poisson process; larger is burstier).
- Popularity: adapter index = floor(n * x) with x drawn from the power distribution
  p(x) = alpha * x^(alpha - 1) on [0, 1]. alpha = 1 is uniform; alpha < 1 concentrates
  requests on low-index adapters (alpha = 0.1 is heavily skewed), as in S-LoRA.
- Lengths: uniform integer ranges (inclusive), a fixed value being a range of width 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vllm_slora.bench.prompt_words import PROMPT_WORDS


@dataclass(frozen=True)
class LengthRange:
    """Uniform integer lengths in [low, high], both inclusive."""

    low: int
    high: int

    def __post_init__(self):
        if not 1 <= self.low <= self.high:
            raise ValueError(f"length range needs 1 <= low <= high, got [{self.low}, {self.high}]")

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        """'32' (fixed) or '8:64' (uniform, inclusive)."""
        low, _, high = str(text).partition(":")
        return cls(int(low), int(high or low))

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, size=size)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True)
class WorkloadSpec:
    num_adapters: int = 8  # 0 = every request goes to the base model
    num_requests: int = 64
    request_rate: float = 2.0  # mean arrivals per second
    cv: float = 1.0  # coefficient of variation of inter-arrival times (1 = Poisson)
    alpha: float = 1.0  # popularity skew: 1 uniform, < 1 skewed towards low indices
    prompt_len: LengthRange = field(default_factory=lambda: LengthRange(16, 64))
    output_len: LengthRange = field(default_factory=lambda: LengthRange(32, 32))
    base_fraction: float = 0.0  # share of requests sent to the base model (no adapter)
    # Rank mix of the adapters; adapter i gets ranks[i % len(ranks)] (as S-LoRA's
    # get_adapter_dirs and vllm_slora.adapters.generate do), so every prefix is mixed.
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    seed: int = 0

    def __post_init__(self):
        if self.num_adapters < 0 or self.num_requests < 1:
            raise ValueError("need num_adapters >= 0 and num_requests >= 1")
        if self.request_rate <= 0 or self.cv <= 0 or self.alpha <= 0:
            raise ValueError("request_rate, cv and alpha must be > 0")
        if not 0.0 <= self.base_fraction <= 1.0:
            raise ValueError("base_fraction must be in [0, 1]")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError("ranks must be a non-empty list of positive ranks")
        object.__setattr__(self, "ranks", tuple(self.ranks))

    def adapter_rank(self, index: int) -> int:
        return self.ranks[index % len(self.ranks)]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["prompt_len"] = str(self.prompt_len)
        data["output_len"] = str(self.output_len)
        data["ranks"] = list(self.ranks)
        return data


@dataclass(frozen=True)
class TraceRequest:
    id: str
    arrival_s: float  # offset from the start of the run
    adapter: str | None  # None = base model
    prompt: str
    prompt_words: int  # the intended prompt length (about one token per word)
    max_tokens: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> TraceRequest:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def adapter_names(num_adapters: int, prefix: str = "lora") -> list[str]:
    # Zero-padded so that names sort in popularity-index order.
    width = max(3, len(str(num_adapters - 1))) if num_adapters else 3
    return [f"{prefix}-{i:0{width}d}" for i in range(num_adapters)]


def power_law_indices(rng: np.random.Generator, num_adapters: int, alpha: float, size: int) -> np.ndarray:
    """Adapter index per request; see the module docstring for the distribution."""
    x = rng.power(alpha, size=size)
    return np.minimum((x * num_adapters).astype(np.int64), num_adapters - 1)


def gamma_arrival_times(rng: np.random.Generator, rate: float, cv: float, size: int) -> np.ndarray:
    """Arrival offsets (s) whose gaps are Gamma(shape=1/cv^2, scale=cv^2/rate): mean 1/rate."""
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=size)
    # The first request arrives at t=0 so a run never starts with dead time.
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def make_prompt(rng: np.random.Generator, num_words: int) -> str:
    # Distinct random words rather than one repeated word: no two prompts share a long
    # prefix, so vLLM's prefix cache does not skew the comparison.
    return " ".join(rng.choice(PROMPT_WORDS, size=num_words))


def generate_trace(spec: WorkloadSpec, names: Sequence[str] | None = None) -> list[TraceRequest]:
    """The requests `spec` describes, sorted by arrival. `names[i]` is adapter i's name."""
    names = list(names) if names is not None else adapter_names(spec.num_adapters)
    if len(names) < spec.num_adapters:
        raise ValueError(f"{spec.num_adapters} adapters requested but only {len(names)} names given")
    n = spec.num_requests
    # Independent streams per property: changing e.g. the length range leaves the
    # arrival times and adapter choices of the same seed unchanged.
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(6)]
    arrivals_rng, adapter_rng, base_rng, prompt_len_rng, output_len_rng, prompt_rng = streams

    arrivals = gamma_arrival_times(arrivals_rng, spec.request_rate, spec.cv, n)
    if spec.num_adapters:
        indices = power_law_indices(adapter_rng, spec.num_adapters, spec.alpha, n)
        to_base = base_rng.random(n) < spec.base_fraction
    else:
        indices = np.zeros(n, dtype=np.int64)
        to_base = np.ones(n, dtype=bool)
    prompt_lens = spec.prompt_len.sample(prompt_len_rng, n)
    output_lens = spec.output_len.sample(output_len_rng, n)

    return [
        TraceRequest(
            id=f"req-{i:05d}",
            arrival_s=round(float(arrivals[i]), 6),
            adapter=None if to_base[i] else names[indices[i]],
            prompt=make_prompt(prompt_rng, int(prompt_lens[i])),
            prompt_words=int(prompt_lens[i]),
            max_tokens=int(output_lens[i]),
        )
        for i in range(n)
    ]


def save_trace(trace: Iterable[TraceRequest], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for request in trace:
            f.write(request.to_json() + "\n")
    return path


def load_trace(path: str | Path) -> list[TraceRequest]:
    with open(path) as f:
        return [TraceRequest.from_dict(json.loads(line)) for line in f if line.strip()]


def without_adapters(trace: Iterable[TraceRequest]) -> list[TraceRequest]:
    """The same trace aimed at the base model: the 'no LoRA' reference run."""
    return [TraceRequest(**{**asdict(r), "adapter": None}) for r in trace]
