"""Metrics from synthetic request records, Prometheus parsing, result files and plots."""

import json

import pytest

from vllm_slora.bench.metrics import RequestRecord, percentile, summarize
from vllm_slora.bench.results import throughput_ratios, write_results
from vllm_slora.bench.server_metrics import gauge_values, parse_prometheus_text


def _ok(i, adapter, sent, first, done, tokens):
    return RequestRecord(id=f"r{i}", adapter=adapter, scheduled_s=sent, sent_s=sent, first_token_s=first,
                         finished_s=done, prompt_tokens=10, output_tokens=tokens)


def test_per_request_metrics():
    r = _ok(0, "a", sent=1.0, first=1.5, done=3.5, tokens=5)
    assert r.ok
    assert r.ttft_s == pytest.approx(0.5)
    assert r.latency_s == pytest.approx(2.5)
    assert r.tpot_s == pytest.approx(0.5)  # 2 s over 4 tokens after the first
    assert _ok(1, "a", 0, 1, 1, tokens=1).tpot_s is None


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile(list(range(101)), 99) == pytest.approx(99)


def test_summary_counts_failures_and_slo():
    records = [
        _ok(0, "a", 0.0, 1.0, 2.0, 10),
        _ok(1, "b", 0.0, 7.0, 8.0, 10),  # misses the 6 s TTFT SLO
        _ok(2, None, 1.0, 2.0, 4.0, 20),
        RequestRecord(id="r3", adapter="nope", scheduled_s=1.0, sent_s=1.0,
                      error="NotFoundError: The model `nope` does not exist."),
        RequestRecord(id="r4", adapter="c", scheduled_s=2.0, error="Timeout: unfinished at the run deadline"),
    ]
    s = summarize(records, wall_s=10.0)
    assert s["requests"] == 5 and s["completed"] == 3 and s["errors"] == 2
    assert s["error_kinds"] == {"NotFoundError": 1, "Timeout": 1}
    assert len(s["error_examples"]) == 2
    assert s["throughput_req_s"] == pytest.approx(0.3)
    assert s["throughput_tok_s"] == pytest.approx(4.0)
    assert s["ttft_s"]["p50"] == pytest.approx(1.0)
    assert s["ttft_s"]["mean"] == pytest.approx(3.0)
    # SLO over all requests: failures count as misses.
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["adapters_requested"] == 4  # a, b, nope, c
    assert s["adapters_touched"] == 2  # a, b served


def test_summary_of_all_failed_run():
    s = summarize([RequestRecord(id="x", adapter=None, scheduled_s=0, error="APIConnectionError: boom")], 1.0)
    assert s["completed"] == 0 and s["errors"] == 1 and s["slo_attainment"] == 0
    assert s["ttft_s"] == {"mean": None, "p50": None, "p99": None}


PROMETHEUS = """\
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="base"} 0.25
vllm:num_requests_running{engine="0",model_name="base"} 3.0
vllm:num_requests_waiting{engine="0",model_name="base"} 1.0
vllm:lora_requests_info{max_lora="8",running_lora_adapters="a,b",waiting_lora_adapters=""} 1.7e+09
vllm:generation_tokens_total{engine="0",model_name="base"} 640.0
"""


def test_prometheus_parsing():
    parsed = parse_prometheus_text(PROMETHEUS)
    assert parsed["vllm:generation_tokens_total"][0][1] == 640.0
    assert 'running_lora_adapters="a,b"' in parsed["vllm:lora_requests_info"][0][0]
    assert gauge_values(PROMETHEUS) == {"pool_usage": 0.25, "running": 3.0, "waiting": 1.0}


def _point(system, n, tok_s, errors=0):
    return {"system": system, "num_adapters": n, "request_rate": 2.0, "status": "ok",
            "summary": {"throughput_tok_s": tok_s, "errors": errors, "ttft_s": {"p50": 0.5},
                        "slo_attainment": 1.0},
            "records": [{"id": "r0"}]}


def test_ratios_results_file_and_plots(tmp_path):
    from vllm_slora.bench.plots import plot_sweep

    points = [_point("base", 0, 100.0), _point("stock", 1, 50.0), _point("stock", 8, 10.0, errors=3),
              _point("slora", 1, 80.0), _point("slora", 8, 75.0)]
    ratios = {r["num_adapters"]: r for r in throughput_ratios(points)}
    assert ratios[8]["stock_vs_base"] == pytest.approx(0.1)
    assert ratios[8]["slora_vs_stock"] == pytest.approx(7.5)
    files = write_results(points, tmp_path / "2025-01-01-cpu-2c", {"cpu_cores": 2}, {"seed": 0})
    doc = json.loads(files["summary"].read_text())
    assert "records" not in doc["points"][0] and doc["machine"]["cpu_cores"] == 2
    assert len(files["requests"].read_text().splitlines()) == 5
    pngs = plot_sweep(points, tmp_path / "2025-01-01-cpu-2c")
    assert [p.name for p in pngs] == ["2025-01-01-cpu-2c-adapters.png"]
    assert pngs[0].stat().st_size > 10_000


def test_request_cut_at_deadline_counts_its_tokens_and_ttft_but_not_as_completed():
    cut = RequestRecord(id="c", adapter="a", scheduled_s=0.0, sent_s=0.0, first_token_s=2.0,
                        output_tokens=5, error="Timeout: unfinished at the run deadline")
    s = summarize([_ok(0, "a", 0.0, 1.0, 3.0, 10), cut], wall_s=10.0)
    assert s["completed"] == 1 and s["errors"] == 1
    assert s["throughput_req_s"] == pytest.approx(0.1)
    assert s["throughput_tok_s"] == pytest.approx(1.5)  # 10 + 5 streamed tokens
    assert s["ttft_s"]["mean"] == pytest.approx(1.5)  # both got a first token
    assert s["latency_s"]["mean"] == pytest.approx(3.0)  # completed only
    assert s["slo_attainment"] == 1.0
    assert s["adapters_touched"] == 1
