"""The synthetic workload generator: distributions, seeding, and JSONL round trips."""

import dataclasses

import numpy as np
import pytest

from vllm_slora.bench.workload import (
    LengthRange,
    WorkloadSpec,
    adapter_names,
    gamma_arrival_times,
    generate_trace,
    load_trace,
    power_law_indices,
    save_trace,
    without_adapters,
)


def _counts(indices, n):
    return np.bincount(indices, minlength=n)


def test_power_law_popularity_is_skewed_towards_low_indices():
    rng = np.random.default_rng(0)
    counts = _counts(power_law_indices(rng, 8, alpha=0.3, size=50_000), 8)
    assert all(counts[i] > counts[i + 1] for i in range(7)), counts
    # alpha = 0.3: P(index 0) = (1/8)^0.3 = 0.54
    assert counts[0] / counts.sum() == pytest.approx(0.125**0.3, abs=0.02)


def test_alpha_one_is_uniform_and_indices_stay_in_range():
    rng = np.random.default_rng(1)
    indices = power_law_indices(rng, 10, alpha=1.0, size=50_000)
    assert indices.min() == 0 and indices.max() == 9
    shares = _counts(indices, 10) / indices.size
    assert np.allclose(shares, 0.1, atol=0.01)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_arrivals_have_requested_rate_and_cv(cv):
    rng = np.random.default_rng(2)
    times = gamma_arrival_times(rng, rate=4.0, cv=cv, size=40_000)
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert 1.0 / gaps.mean() == pytest.approx(4.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_trace_rate_lengths_and_adapters():
    spec = WorkloadSpec(num_adapters=4, num_requests=2000, request_rate=5.0,
                        prompt_len=LengthRange(3, 9), output_len=LengthRange(16, 16), seed=3)
    trace = generate_trace(spec)
    arrivals = [r.arrival_s for r in trace]
    assert arrivals == sorted(arrivals)
    assert len(trace) / arrivals[-1] == pytest.approx(5.0, rel=0.1)
    assert {r.max_tokens for r in trace} == {16}
    assert {r.prompt_words for r in trace} == set(range(3, 10))  # inclusive bounds, all hit
    assert all(len(r.prompt.split()) == r.prompt_words for r in trace)
    assert {r.adapter for r in trace} == set(adapter_names(4))
    assert len({r.id for r in trace}) == len(trace)


def test_same_seed_same_trace_other_seed_other_trace():
    spec = WorkloadSpec(num_adapters=8, num_requests=50, seed=7)
    assert generate_trace(spec) == generate_trace(spec)
    other = generate_trace(dataclasses.replace(spec, seed=8))
    assert other != generate_trace(spec)
    assert [r.arrival_s for r in other] != [r.arrival_s for r in generate_trace(spec)]


def test_adapter_count_changes_only_the_adapter_choice():
    # What lets the base reference and every point of a sweep share one workload.
    a = generate_trace(WorkloadSpec(num_adapters=2, num_requests=30, seed=5))
    b = generate_trace(WorkloadSpec(num_adapters=64, num_requests=30, seed=5))
    strip = lambda trace: [dataclasses.replace(r, adapter=None) for r in trace]  # noqa: E731
    assert strip(a) == strip(b)
    assert [r.adapter for r in a] != [r.adapter for r in b]


def test_base_fraction_and_no_adapters():
    trace = generate_trace(WorkloadSpec(num_adapters=4, num_requests=1000, base_fraction=0.25, seed=0))
    share = sum(r.adapter is None for r in trace) / len(trace)
    assert share == pytest.approx(0.25, abs=0.05)
    assert all(r.adapter is None for r in generate_trace(WorkloadSpec(num_adapters=0, num_requests=5)))
    assert all(r.adapter is None for r in without_adapters(trace))


def test_jsonl_round_trip_is_identity(tmp_path):
    trace = generate_trace(WorkloadSpec(num_adapters=3, num_requests=40, base_fraction=0.2, seed=11))
    path = save_trace(trace, tmp_path / "sub" / "trace.jsonl")
    assert len(path.read_text().splitlines()) == 40  # one request per line
    assert load_trace(path) == trace
    save_trace(load_trace(path), tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()


def test_bad_specs_are_refused():
    with pytest.raises(ValueError):
        LengthRange(5, 2)
    with pytest.raises(ValueError):
        WorkloadSpec(request_rate=0)
    with pytest.raises(ValueError):
        generate_trace(WorkloadSpec(num_adapters=5), names=["only-one"])
    assert LengthRange.parse("32") == LengthRange(32, 32)
    assert LengthRange.parse("8:64") == LengthRange(8, 64)


def test_rank_mix_cycles():
    spec = WorkloadSpec(ranks=(8, 64))
    assert [spec.adapter_rank(i) for i in range(4)] == [8, 64, 8, 64]
