"""The pure helpers of benchmarks/bench_coserve.py (no server, no training)."""

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_coserve.py"
_spec = importlib.util.spec_from_file_location("bench_coserve", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_coserve", bench)
_spec.loader.exec_module(bench)


def test_tokens_in_window_counts_steps_finished_inside():
    samples = [(1.0, 256), (2.0, 512), (3.0, 768), (4.5, 1024)]
    assert bench.cumulative_at(samples, 0.5) == 0
    assert bench.cumulative_at(samples, 2.0) == 512
    assert bench.tokens_in_window(samples, 1.5, 3.5) == 512  # the steps at 2.0 and 3.0
    assert bench.tokens_in_window(samples, 0.0, 10.0) == 1024
    assert bench.tokens_in_window(samples, 4.6, 9.0) == 0
    assert bench.window_rate(samples, 1.5, 3.5) == pytest.approx(256.0)
    assert bench.window_rate(samples, 2.0, 2.0) is None
    with pytest.raises(ValueError):
        bench.tokens_in_window(samples, 3.0, 2.0)


def test_choose_rates():
    assert bench.choose_rates(4.0, 0.35, 0.75) == (1.4, 3.0)
    assert bench.choose_rates(None, 0.35, 0.75, moderate=1.0, heavy=2.0) == (1.0, 2.0)
    assert bench.choose_rates(4.0, 0.35, 0.75, heavy=2.0) == (1.4, 2.0)
    with pytest.raises(ValueError, match="calibrated"):
        bench.choose_rates(None, 0.35, 0.75, moderate=1.0)
    with pytest.raises(ValueError, match="moderate <= heavy"):
        bench.choose_rates(4.0, 0.35, 0.75, moderate=3.0, heavy=2.0)


def test_training_texts_are_long_deterministic_sentences():
    a, b = bench.training_texts(3, 300, seed=1), bench.training_texts(3, 300, seed=1)
    assert a == b and len(a) == 3 and a != bench.training_texts(3, 300, seed=2)
    assert all(len(t.split()) == 300 and t.endswith(".") and t[0].isupper() for t in a)


def test_latency_figures_and_ratio():
    summary = {"ttft_s": {"p50": 0.1, "p99": 0.4, "mean": 0.2}, "tpot_s": {"p50": 0.05, "p99": 0.08, "mean": 0.06}}
    assert bench.latency_figures(summary) == {"ttft_p50": 0.1, "ttft_p99": 0.4, "tpot_p50": 0.05, "tpot_p99": 0.08}
    assert bench.latency_figures(None) == dict.fromkeys(("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"))
    assert bench.ratio(3.0, 2.0) == 1.5
    assert bench.ratio(None, 2.0) is None and bench.ratio(0.0, 0.0) is None
    assert bench.ratio(1.0, 0.0) == float("inf")
    assert bench.json_safe({"a": [float("inf"), 1.0], "b": float("nan")}) == {"a": ["inf", 1.0], "b": "nan"}


def _phase(tok_s=None, ttft=None, tpot=None):
    inference = None if ttft is None else {"ttft_s": {"p50": ttft / 2, "p99": ttft}, "tpot_s": {"p50": tpot / 2, "p99": tpot}}
    return {"trained_tok_s": tok_s, "inference": inference}


def test_figures_and_goals():
    phases = {
        "no_job": {"moderate": _phase(None, 1.0, 0.10), "heavy": _phase(None, 2.0, 0.20)},
        "coserve": {"idle": _phase(400.0), "moderate": _phase(300.0, 1.05, 0.105),
                    "heavy": _phase(100.0, 2.5, 0.21)},
        "hf_side": {"idle": _phase(200.0), "moderate": _phase(100.0, 1.5, 0.2), "heavy": _phase(80.0, 3.0, 0.3)},
    }
    fig = bench.figures(phases)
    assert fig["coserve_fraction_of_idle"] == {"idle": 1.0, "moderate": 0.75, "heavy": 0.25}
    assert fig["coserve_vs_hf_side"]["moderate"] == 3.0
    assert fig["p99_vs_no_job"]["coserve"]["heavy"]["ttft_p99"] == pytest.approx(1.25)
    goals = {g["goal"]: g for g in bench.evaluate_goals(fig)}
    met = {name: g["met"] for name, g in goals.items()}
    assert met["moderate: co-served ttft_p99 within +10% of no job"] is True
    assert met["heavy: co-served ttft_p99 within +10% of no job"] is False
    speed = [g for name, g in goals.items() if name.startswith("moderate: co-served trained")][0]
    assert speed["met"] is True and speed["value"] == 3.0
    heavy_speed = [g for name, g in goals.items() if name.startswith("heavy: co-served trained")][0]
    assert heavy_speed["met"] is False  # 1.25x < 1.5x
    idle = [g for name, g in goals.items() if name.startswith("idle")][0]
    assert idle["met"] is True and idle["value"] == 2.0


def test_per_round_ratios_pair_each_window_with_the_no_job_window_of_its_round():
    def windows(*tpot99):
        return {"windows": [{"ttft_p99": 0.2, "tpot_p99": t, "tpot_p50": t / 2} for t in tpot99]}

    phases = {"no_job": {"heavy": windows(0.10, 0.20, 0.10)}, "coserve": {"heavy": windows(0.11, 0.30, 0.09)}}
    paired = bench.paired_round_ratios(phases, "coserve", "heavy")
    assert paired["tpot_p99"]["ratios"] == [1.1, 1.5, 0.9] and paired["tpot_p99"]["median"] == 1.1
    assert paired["ttft_p99"]["median"] == 1.0
    assert bench.paired_round_ratios(phases, "coserve", "moderate")["tpot_p99"] == {"ratios": [], "median": None}


def test_idle_round_ratios_pair_each_round_and_take_the_median():
    def idle(*tokens):  # one 10 s window per round
        return {"idle": {"windows": [{"t0": 100.0 * i, "t1": 100.0 * i + 10.0, "trained_tokens": t}
                                     for i, t in enumerate(tokens)]}}

    phases = {"coserve": idle(1800.0, 2000.0, 1500.0, None), "hf_side": idle(2000.0, 2000.0, 1000.0, 900.0)}
    assert bench.idle_round_ratios(phases) == {"ratios": [0.9, 1.0, 1.5], "median": 1.0}  # a window without figures drops
    assert bench.idle_round_ratios({"coserve": idle(1.0), "hf_side": {}}) == {"ratios": [], "median": None}
    assert bench.figures({"no_job": {}, **phases})["idle_vs_hf_by_round"]["median"] == 1.0


def test_goals_when_the_hf_loop_made_no_step():
    phases = {"no_job": {"moderate": _phase(None, 1.0, 0.1), "heavy": _phase(None, 2.0, 0.2)},
              "coserve": {"idle": _phase(400.0), "moderate": _phase(300.0, 1.0, 0.1), "heavy": _phase(0.0, 2.0, 0.2)},
              "hf_side": {"idle": _phase(200.0), "moderate": _phase(0.0, 1.5, 0.2), "heavy": _phase(0.0, 3.0, 0.3)}}
    speed = [g for g in bench.evaluate_goals(bench.figures(phases)) if "trained tok/s >=" in g["goal"]]
    assert speed[0]["value"] == float("inf") and speed[0]["met"] is True
    assert speed[1]["value"] is None and speed[1]["met"] is None  # neither trained: nothing to compare


def test_goals_not_measured_without_hf():
    phases = {"no_job": {"moderate": _phase(None, 1.0, 0.1), "heavy": _phase(None, 2.0, 0.2)},
              "coserve": {"idle": _phase(400.0), "moderate": _phase(300.0, 1.0, 0.1), "heavy": _phase(100.0, 2.0, 0.2)},
              "hf_side": {}}
    goals = bench.evaluate_goals(bench.figures(phases))
    assert [g["met"] for g in goals] == [None, True, True, True, True, None, None, None]  # None: no publish probe


def test_publish_goal_against_the_first_step_that_could_admit_the_request():
    phases = {"no_job": {}, "coserve": {"idle": _phase(400.0)}, "hf_side": {}}
    fig = bench.figures(phases)
    # Two engine steps from the update, but the request arrived a step later: none was lost.
    probe = {"coserve": {"probe_update_to_first_request_engine_steps": {"p50": 1, "max": 2},
                         "probe_first_request_steps_late": {"p50": 0, "max": 0}}}
    (goal,) = [g for g in bench.evaluate_goals(fig, probe) if g["goal"].startswith("publish")]
    assert goal["met"] is True and goal["value"] == 0 and goal["engine_steps_from_update_max"] == 2
    probe["coserve"]["probe_first_request_steps_late"]["max"] = 1
    (goal,) = [g for g in bench.evaluate_goals(fig, probe) if g["goal"].startswith("publish")]
    assert goal["met"] is False
    (goal,) = [g for g in bench.evaluate_goals(fig, {}) if g["goal"].startswith("publish")]
    assert goal["met"] is None


def test_check_job_events():
    def metrics(step):
        return {"message": f"Step {step}", "level": "info",
                "data": {"step": step, "train_loss": 1.0, "trained_tokens": 256 * step}}

    def published(step, servable=True):
        data = {"step": step, "publish_seconds": 0.1}
        if servable:
            data["update_to_servable_seconds"] = 0.2
        return {"message": f"Published step {step}: ...", "level": "info", "data": data}

    good = [metrics(s) for s in range(1, 11)] + [published(5), published(10)]
    assert bench.check_job_events(good, 5) == []
    bad = [metrics(1), metrics(3), published(3, servable=False),
           {"message": "Fine-tuning job failed: x", "level": "error", "data": None}]
    problems = bench.check_job_events(bad, 5)
    assert any("not one per step" in p for p in problems)
    assert any("off the publish_every" in p for p in problems)
    assert any("without update_to_servable" in p for p in problems)
    assert any("job failed" in p for p in problems)
    missing = [metrics(s) for s in range(1, 16)] + [published(10)]
    assert any("steps [5]" in p for p in bench.check_job_events(missing, 5))


def test_parse_args_quick_defaults():
    args = bench.parse_args(["--quick", "--num-adapters", "2"])
    assert args.phase_seconds == 15.0 and args.num_adapters == 2 and args.disk_repeats == 3
    full = bench.parse_args([])
    assert full.phase_seconds == 60.0 and full.num_adapters == 8 and full.lora_rank == 16


def test_speedup_goal_over_the_slacks_measured():
    """The server's slack misses 1.5x; slack 0.5 meets it at p99 no worse than the side
    process's; slack 1.0 trains more but at a worse p99, so it does not count."""
    phases = {
        "no_job": {"moderate": _phase(None, 1.0, 0.10), "heavy": _phase(None, 2.0, 0.20)},
        "coserve": {"idle": _phase(400.0), "moderate": _phase(100.0, 1.0, 0.10), "heavy": _phase(10.0, 2.0, 0.2)},
        "coserve@0.5": {"moderate": _phase(180.0, 1.4, 0.15), "heavy": _phase(25.0, 2.9, 0.29)},
        "coserve@1": {"moderate": _phase(300.0, 1.6, 0.3), "heavy": _phase(40.0, 3.5, 0.4)},
        "hf_side": {"idle": _phase(200.0), "moderate": _phase(100.0, 1.5, 0.2), "heavy": _phase(20.0, 3.0, 0.3)},
    }
    fig = bench.figures(phases)
    assert fig["coserve_settings"] == ["coserve", "coserve@0.5", "coserve@1"]
    assert fig["trained_tok_s"]["coserve@0.5"]["heavy"] == 25.0
    goals = bench.evaluate_goals(fig)
    moderate, heavy = [g for g in goals if "side process" in g["goal"]]
    assert moderate["met"] is True and moderate["setting"] == "coserve@0.5" and moderate["value"] == 1.8
    assert heavy["met"] is False and heavy["setting"] == "coserve"  # 0.5: 1.25x only; 1.0: p99 worse
    assert [c["met"] for c in heavy["settings"]] == [False, False, False]
    # The p99-within-10% goals judge the server's own slack only.
    p99 = [g for g in goals if "within" in g["goal"]]
    assert all(g["met"] is True for g in p99)


def test_state_change_over_a_window():
    before = {"slack": 0.1, "steps": 10, "seconds": 1.5, "loan_blocks": 4, "loans": 1, "arrivals_watched": True,
              "max_jobs": 2, "waiting": 1}
    after = {"slack": 0.1, "steps": 14, "seconds": 2.0, "loan_blocks": 6, "loans": 2, "arrivals_watched": True,
             "max_jobs": 2, "waiting": 0}
    assert bench.state_change(before, after) == {"slack": 0.1, "steps": 4, "seconds": 0.5, "loan_blocks": 6,
                                                 "loans": 1, "arrivals_watched": True, "max_jobs": 2, "waiting": 0}


def test_log_problems_are_those_before_the_shutdown(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("\n".join([
        "(EngineCore pid=1) INFO 12-01 09:40:00 [core.py:1] serving",
        "(EngineCore pid=1) ERROR 12-01 09:41:00 [core.py:2] a unit failed",
        "(EngineCore pid=1) INFO 12-01 09:50:19 [core.py:1454] [shutdown] EngineCore: trigger received signal=SIGINT",
        "(APIServer pid=2) ERROR 12-01 09:50:19 [async_llm.py:906] AsyncLLM output_handler failed.",
        "(APIServer pid=2) ERROR 12-01 09:50:19 [async_llm.py:906] Traceback (most recent call last):",
    ]))
    assert bench.log_problems(log) == ["(EngineCore pid=1) ERROR 12-01 09:41:00 [core.py:2] a unit failed"]
    assert bench.log_problems(tmp_path / "missing.log") == []


def test_round_orders_balance_each_condition_in_time():
    orders = bench.round_orders(["a", "b", "c"], 4)
    assert orders == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"], ["c", "b", "a"]]
    positions = {c: sum(order.index(c) for order in orders) for c in "abc"}
    assert len(set(positions.values())) == 1  # the same mean position: a linear drift weighs on each alike
    assert bench.round_orders(["a", "b"], 1) == [["a", "b"]]


def test_pool_takes_percentiles_over_all_windows_requests_and_tokens_over_their_length():
    from vllm_slora.bench.metrics import RequestRecord

    def record(i, ttft):
        return RequestRecord(id=str(i), adapter="a", scheduled_s=0.0, sent_s=0.0, first_token_s=ttft,
                             finished_s=ttft + 0.4, prompt_tokens=3, output_tokens=5)

    fast = [record(i, 0.1) for i in range(99)]
    slow = [record(99, 2.0)]
    windows = [
        {"condition": "coserve", "rate_label": "heavy", "t0": 0.0, "t1": 10.0, "records": fast, "cpu_s": {"server": 15.0},
         "load_average_1m": [1.0, 1.5], "planner": {"steps": 3, "units": 10, "slack": 0.05}, "trained_tokens": 512},
        {"condition": "coserve", "rate_label": "heavy", "t0": 30.0, "t1": 40.0, "records": slow, "cpu_s": {"server": 5.0},
         "load_average_1m": [1.5, 2.0], "planner": {"steps": 1, "units": 4, "slack": 0.25}, "trained_tokens": 256},
    ]
    out = bench.pool(windows, rate=5.0)
    assert out["window_s"] == 20.0 and out["trained_tokens"] == 768 and out["trained_tok_s"] == 768 / 20
    assert out["inference"]["requests"] == 100 and out["ttft_p50"] == pytest.approx(0.1)
    assert out["ttft_p99"] > 0.1  # the slow window's request is in the pooled tail
    assert out["cpu_cores_busy"] == {"server": 1.0} and out["load_average_1m"] == [1.0, 2.0]
    assert [w["cores"] for w in out["windows"]] == [{"server": 1.5}, {"server": 0.5}]
    assert out["planner"] == {"steps": 4, "units": 14, "slack": 0.25}  # counters summed, gauges as at the end
    assert [w["ttft_p50"] for w in out["windows"]] == [pytest.approx(0.1), pytest.approx(2.0)]
    assert "trained_tokens" not in bench.pool([{**windows[0], "trained_tokens": None}], rate=5.0)


def test_steady_span_runs_from_the_first_to_the_last_step_finished_inside_the_window():
    # Polled samples: the count changes at 2.0 (step 2), 3.5, 5.0, 6.5; a paused stretch before.
    samples = [(0.0, 256), (1.0, 256), (2.0, 512), (2.25, 512), (3.5, 768), (5.0, 1024), (6.5, 1280), (8.0, 1280)]
    assert bench.steady_span(samples, 1.5, 7.0) == (768, 4.5)  # 3 steps in 4.5 s, not 4 steps counted in 5.5 s
    assert bench.steady_span(samples, 1.5, 6.0) == (512, 3.0)
    assert bench.steady_span(samples, 4.0, 6.0) is None  # one step inside: no span
    assert bench.steady_span(samples, 0.0, 1.5) is None  # the first sample is not a change


def test_idle_figures_use_the_steady_span_and_keep_the_counted_ones():
    def window(t0, tokens, steady):
        return {"condition": "x", "rate_label": "idle", "t0": t0, "t1": t0 + 30.0, "records": [], "cpu_s": {},
                "load_average_1m": [1.0, 1.0], "planner": None, "trained_tokens": tokens, "steady": steady}

    co = bench.pool([window(0.0, 5120, (4864, 27.0)), window(100.0, 5376, (5120, 28.0))], rate=0.0)
    hf = bench.pool([window(50.0, 5376, (5120, 27.5)), window(150.0, 5376, (4864, 26.0))], rate=0.0)
    assert co["steady_tok_s"] == pytest.approx((4864 + 5120) / 55.0)
    assert "steady_tok_s" not in bench.pool([window(0.0, 256, None)], rate=0.0)
    fig = bench.figures({"no_job": {}, "coserve": {"idle": co}, "hf_side": {"idle": hf}})
    assert fig["trained_tok_s"]["coserve"]["idle"] == pytest.approx(co["steady_tok_s"])
    assert fig["idle_counted_tok_s"] == {"coserve": co["trained_tok_s"], "hf_side": hf["trained_tok_s"]}
    ratios = fig["idle_vs_hf_by_round"]["ratios"]
    assert ratios == [round((4864 / 27.0) / (5120 / 27.5), 4), round((5120 / 28.0) / (4864 / 26.0), 4)]


def test_windows_keep_each_requests_latencies_for_resampling():
    from vllm_slora.bench.metrics import RequestRecord

    records = [RequestRecord(id="a", adapter=None, scheduled_s=0.0, sent_s=1.0, first_token_s=1.25, finished_s=2.25,
                             output_tokens=5),
               RequestRecord(id="b", adapter=None, scheduled_s=0.0, sent_s=1.0, first_token_s=1.5, finished_s=1.5,
                             output_tokens=1)]  # one token: a TTFT, no TPOT
    # In the trace's order, None where a request has none (request i is the same request in every window of a round).
    assert bench.request_latencies(records) == {"ttft_values": [0.25, 0.5], "tpot_values": [0.25, None]}
    window = {"condition": "coserve", "rate_label": "moderate", "t0": 0.0, "t1": 3.0, "records": records,
              "cpu_s": {}, "load_average_1m": [1.0, 1.0], "planner": None, "trained_tokens": 0}
    assert bench.pool([window], rate=1.0)["windows"][0]["tpot_values"] == [0.25, None]


def test_p99_ratio_interval_resamples_whole_rounds_and_keeps_them_paired():
    def windows(*per_round):
        return [{"tpot_values": list(values)} for values in per_round]

    base = windows([0.10] * 50, [0.20] * 50, [0.10] * 50, [0.20] * 50)
    # Every round 5 % slower than its no-job window: the drift between rounds (0.1 vs 0.2)
    # is in both, so every draw gives 1.05 however unequal the rounds it picks.
    same = bench.p99_ratio_interval(windows(*[[v * 1.05 for v in w["tpot_values"]] for w in base]), base, "tpot")
    assert same["rounds"] == 4 and same["p5"] == pytest.approx(1.05) and same["p95"] == pytest.approx(1.05)
    # One round's no-job window alone slow: the pooled ratio depends on whether that round is drawn.
    mixed = bench.p99_ratio_interval(windows([0.1] * 50, [0.1] * 50, [0.1] * 50, [0.1] * 50),
                                     windows([0.1] * 50, [0.1] * 50, [0.1] * 50, [0.3] * 50), "tpot", seed=1)
    assert mixed["p5"] < 0.5 and mixed["p95"] == pytest.approx(1.0)
    assert bench.p99_ratio_interval(windows([0.1]), windows([0.1]), "tpot") is None  # one round: no spread
    assert bench.p99_ratio_interval(windows([0.1], []), windows([0.1], [0.1]), "tpot") is None  # an empty window drops
    assert bench.p99_ratio_interval(windows([0.1], [0.1]), windows([0.1], [0.1]), "ttft") is None  # no such values
    with_gaps = bench.p99_ratio_interval(windows([0.1, None], [0.1]), windows([0.1], [None, 0.1]), "tpot")
    assert with_gaps["p5"] == pytest.approx(1.0)  # requests without a value are left out


def test_p99_goals_carry_the_interval():
    phases = {"no_job": {"moderate": {**_phase(None, 1.0, 0.10),
                                      "windows": [{"ttft_values": [1.0] * 10, "tpot_values": [0.1] * 10}] * 3}},
              "coserve": {"moderate": {**_phase(300.0, 1.0, 0.108),
                                       "windows": [{"ttft_values": [1.0] * 10, "tpot_values": [0.108] * 10}] * 3}},
              "hf_side": {}}
    fig = bench.figures(phases)
    assert fig["p99_vs_no_job_interval"]["coserve"]["moderate"]["tpot_p99"]["p50"] == pytest.approx(1.08)
    (goal,) = [g for g in bench.evaluate_goals(fig) if g["goal"] == "moderate: co-served tpot_p99 within +10% of no job"]
    assert goal["met"] is True and goal["interval_90"]["p95"] == pytest.approx(1.08)
    assert fig["p99_vs_no_job_interval"]["coserve"]["heavy"]["tpot_p99"] is None  # not run


def test_parse_args_rates_and_no_idle_rounds():
    args = bench.parse_args(["--rates", "moderate", "--idle-rounds", "0"])
    assert args.rates == ["moderate"] and args.idle_rounds == 0
    assert bench.parse_args([]).rates == ["moderate", "heavy"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--rates", "moderate,light"])


def test_interval_bars_are_distances_from_the_bar_top_in_ms():
    fig = {"latency": {"no_job": {"moderate": {"tpot_p99": 0.100}, "heavy": {"tpot_p99": None}}},
           "p99_vs_no_job_interval": {"coserve": {"moderate": {"tpot_p99": {"p5": 0.95, "p50": 1.0, "p95": 1.2}},
                                                  "heavy": {"tpot_p99": None}}}}
    low, high = bench.interval_bars(fig, "coserve", "tpot_p99", [105.0, 0.0])
    assert low == [pytest.approx(10.0), 0.0] and high == [pytest.approx(15.0), 0.0]  # 95-120 ms around 105
    assert bench.interval_bars(fig, "no_job", "tpot_p99", [100.0, 0.0]) is None


def test_paired_request_change_compares_each_request_with_its_twin_of_the_round():
    base = [{"tpot_values": [0.10, 0.20, None]}, {"tpot_values": [0.40, 0.10]}]
    mine = [{"tpot_values": [0.11, 0.22, 0.5]}, {"tpot_values": [0.44, None]}]  # every served twin 10 % slower
    change = bench.paired_request_change(mine, base, "tpot")
    assert change["requests"] == 3 and change["mean_ratio"] == pytest.approx(1.1)
    assert change["p5"] == pytest.approx(1.1) and change["p95"] == pytest.approx(1.1)  # the rounds' drift cancels
    assert bench.paired_request_change(mine[:1], base[:1], "tpot") is None  # one round
    assert bench.paired_request_change(mine, base, "ttft") is None  # no values


def test_machine_cpu_seconds_from_proc_stat():
    line = "cpu  800 100 300 5000 40 20 30 250 0 0\n"  # user nice system idle iowait irq softirq steal ...
    assert bench.machine_cpu_seconds(line, 100) == {"machine_busy": 12.5, "machine_steal": 2.5}
    reading = bench.CpuMeter().read()  # no process trees: the machine's figures only (on Linux)
    assert set(reading) <= {"machine_busy", "machine_steal"}


def test_refigure_recomputes_a_saved_result_from_its_windows(tmp_path):
    def loaded(tpot):
        return {**_phase(None, 0.2, tpot), "windows": [{"ttft_values": [0.2] * 20, "tpot_values": [tpot] * 20}] * 3}

    document = {"phases": {"no_job": {"moderate": loaded(0.10)}, "coserve": {"moderate": {**loaded(0.12), "trained_tok_s": 9.0}},
                           "hf_side": {}},
                "publish": {}, "rates_req_s": {"idle": 0.0, "moderate": 2.0, "heavy": 4.0},
                "config": {"lora_rank": 16, "seq_len": 256, "model": "/m/SmolLM2"}, "machine": {"cpu_cores": 2},
                "figures": {"stale": True}, "goals": []}
    path = tmp_path / "coserve-x.json"
    path.write_text(__import__("json").dumps(document))
    assert bench.main(["--refigure", str(path)]) == 0
    saved = __import__("json").loads(path.read_text())
    assert "stale" not in saved["figures"] and "refigured" in saved
    assert saved["figures"]["p99_vs_no_job_interval"]["coserve"]["moderate"]["tpot_p99"]["p50"] == pytest.approx(1.2)
    (goal,) = [g for g in saved["goals"] if g["goal"] == "moderate: co-served tpot_p99 within +10% of no job"]
    assert goal["met"] is False and goal["value"] == pytest.approx(1.2)
    assert path.with_suffix(".png").stat().st_size > 0
