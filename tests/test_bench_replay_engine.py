"""End to end against a real `vllm serve`: every request of a replayed trace is accounted for.

Uses the tests' random tiny Llama (built in about a second) with two generated LoRA adapters on
stock vLLM LoRA, plus one request for an adapter that does not exist, which must come
back as a counted error rather than vanish.
"""

import dataclasses

import pytest

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tiny_model_and_adapters(tiny_model, tmp_path_factory):
    from vllm_slora.adapters.generate import generate_adapters
    from vllm_slora.bench.systems import AdapterRef

    root = tmp_path_factory.mktemp("bench-e2e")
    model = tiny_model
    adapters = generate_adapters(model, root / "adapters", 2, ranks=(8, 16), target_modules=("q_proj", "v_proj"))
    return model, [AdapterRef(a.name, str(a.path), a.rank) for a in adapters], root


def test_replay_against_real_server_accounts_for_every_request(tiny_model_and_adapters):
    from vllm_slora.bench.runner import Point, RunOptions, run_system
    from vllm_slora.bench.systems import ServerSettings
    from vllm_slora.bench.workload import LengthRange, WorkloadSpec, generate_trace

    model, adapters, root = tiny_model_and_adapters
    spec = WorkloadSpec(num_adapters=2, num_requests=6, request_rate=20.0, base_fraction=0.3,
                        prompt_len=LengthRange(4, 8), output_len=LengthRange(4, 8), seed=1)
    trace = generate_trace(spec, [a.name for a in adapters])
    trace.append(dataclasses.replace(trace[-1], id="req-unknown", adapter="no-such-adapter"))

    [result] = run_system(
        "stock", model, adapters, [Point({"num_adapters": 2, "request_rate": 20.0}, trace)],
        ServerSettings(max_model_len=256, kv_cache_memory_bytes=64 * 1024 * 1024, max_loras=2),
        RunOptions(deadline_s=60, log_dir=root / "logs", warmup=False, progress=False),
    )
    assert result["status"] == "ok", result.get("error")
    records = {r["id"]: r for r in result["records"]}
    assert sorted(records) == sorted(r.id for r in trace)  # nothing dropped, nothing invented

    summary = result["summary"]
    assert summary["requests"] == 7 and summary["completed"] == 6 and summary["errors"] == 1
    assert records["req-unknown"]["error"].startswith("NotFoundError")
    for request in trace[:-1]:
        record = records[request.id]
        assert record["error"] is None
        assert record["output_tokens"] == request.max_tokens  # ignore_eos: exact lengths
        assert 0 < record["ttft_s"] <= record["latency_s"]
    assert summary["adapters_touched"] == len({r.adapter for r in trace[:-1] if r.adapter})
    assert result["server_metrics"]["samples"] >= 1
    assert 0.0 <= result["server_metrics"]["pool_usage"]["max"] <= 1.0
