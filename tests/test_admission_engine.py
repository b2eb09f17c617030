"""Admission under pool pressure in a real engine (issue #9 B and 6).

The scenarios run in a child process on one engine with a 12-block pool (11 usable):
see tests/admission_scenarios.py. Every scenario is bounded in scheduler steps, so a
wrong admission rule fails its test instead of hanging the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hf_reference import hf_greedy

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    from vllm_slora.adapters.generate import generate_adapters

    root = tmp_path_factory.mktemp("admission")
    small = generate_adapters(tiny_model / "config.json", root, 4, ranks=(4,), seed=11, name_prefix="small")
    (big,) = generate_adapters(tiny_model / "config.json", root, 1, ranks=(64,), seed=12, name_prefix="big")
    return small, big


@pytest.fixture(scope="module")
def results(tiny_model, adapters, tmp_path_factory):
    small, big = adapters
    work = tmp_path_factory.mktemp("admission-run")
    spec = {
        "model": str(tiny_model),
        "small": [{"name": a.name, "path": str(a.path)} for a in small],
        "big": {"name": big.name, "path": str(big.path)},
    }
    (work / "spec.json").write_text(json.dumps(spec))
    out = work / "results.json"
    proc = subprocess.run([sys.executable, "-m", "tests.admission_scenarios", str(work / "spec.json"), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["pool_blocks"] == 12
    return data


def scenario(results, name):
    data = results[name]
    assert "error" not in data, data["error"]
    return data


def test_request_that_can_never_fit_beside_its_adapter_is_refused_where_it_enters(results, adapters):
    """B: 8 adapter blocks + 4 KV blocks (400 tokens) > 11 usable: VLLMValidationError
    (HTTP 400 in the server) naming the adapter, both counts and the pool size; the same
    adapter with a prompt that fits (8 + 2) is served."""
    data = scenario(results, "refused_where_it_enters")
    assert data["raised"] == "VLLMValidationError", data
    for needle in (adapters[1].name, "8 pool blocks", "400 tokens", "4 KV blocks", "whole pool has 11"):
        assert needle in data["message"], data["message"]
    assert data["fitting_tokens"] == 4


def test_scheduler_refuses_a_never_fitting_request_and_the_queue_moves_on(results):
    """B, the deadlock: a never-fitting request that reaches the scheduler (frontend check
    bypassed) used to pin its adapter, fail its KV allocation and stop the waiting queue
    for good. Now it finishes with an error naming the block counts, its adapter is never
    loaded, and the requests behind it are served."""
    data = scenario(results, "refused_by_the_scheduler")
    finished = data["finished"]
    never = [v for k, v in finished.items() if k.startswith("never")]
    assert never and never[0]["reason"] == "error", finished
    assert "whole pool has 11" in never[0]["stop_reason"], never[0]
    behind = [v for k, v in finished.items() if k.startswith("behind")]
    assert len(behind) == 3 and all(len(v["tokens"]) == 4 for v in behind), finished
    assert data["loads"] <= 1, data  # the small adapter only


def test_request_that_fits_later_waits_unloaded_while_others_go_ahead(results, tiny_model, adapters):
    """B, the loop: the rank-64 adapter (8) fits in the free blocks but not beside its
    prompt's KV (2). It is not pinned (loaded, then evicted) every step; the short
    requests behind it run while it waits, and it runs once the long request is done."""
    data = scenario(results, "fits_later")
    finished = data["finished"]
    assert {"long", "big", "short0", "short1", "short2"} <= set(finished), data
    long_done = finished["long"]["step"]
    assert all(finished[f"short{i}"]["step"] < long_done for i in range(3)), finished
    assert finished["big"]["step"] > long_done
    assert data["loads"] <= 3, data  # small[1], small[2] and the big adapter, once each
    from tests.admission_scenarios import _ids

    want = hf_greedy(tiny_model, [_ids(200, salt=3)], 4, adapter_dir=adapters[1].path)[0]
    assert finished["big"]["tokens"][: len(want)] == want


def test_large_adapter_behind_a_stream_of_small_ones_is_served_within_a_bound(results, tiny_model, adapters):
    """6: a rank-64 request (8 + 1 blocks) behind a never-ending stream of rank-4 ones,
    which keep fewer than 9 blocks free, is admitted after at most MAX_BLOCKED_STEPS
    refused steps plus the time running requests take to finish (each runs 6 steps)."""
    data = scenario(results, "stream")
    assert data["served"] > 20, f"the stream did not run: {data}"
    large = data["large"]
    assert large is not None, f"starved: {data['served']} stream requests ran in {data['max_steps']} steps, the large one never"
    assert large["step"] - data["big_at"] <= results["max_blocked_steps"] + 40, data
    from tests.admission_scenarios import _ids

    want = hf_greedy(tiny_model, [_ids(20, salt=99)], 4, adapter_dir=adapters[1].path)[0]
    assert large["tokens"][: len(want)] == want
