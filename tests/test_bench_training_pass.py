"""benchmarks/bench_training_pass.py end to end on the tiny model: every system trains the same
math (its own losses agree with HF + PEFT's for two steps) and the figures and plot are written."""

import importlib.util
import json
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training_pass.py"
_spec = importlib.util.spec_from_file_location("bench_training_pass", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_training_pass", bench)
_spec.loader.exec_module(bench)


def test_bench_training_pass_on_the_tiny_model(tiny_model, tmp_path):
    code = bench.main(["--model", str(tiny_model), "--length-scale", "0.05", "--repeats", "1", "--rank", "4",
                       "--out-dir", str(tmp_path)])
    assert code == 0
    (result,) = tmp_path.glob("training_pass-*.json")
    document = json.loads(result.read_text())
    assert [row["workload"] for row in document["results"]] == list(bench.WORKLOADS)
    for row in document["results"]:
        assert row["same_math"] and row["loss_max_rel_diff"] <= bench.LOSS_AGREEMENT
        losses = row["first_two_losses"]["hf_peft"]
        assert losses[1] != losses[0]  # the second step runs after an update: the check covers it
        # The units with F.linear instead of oneDNN (finetune/frozen_linear.py) train the same math too.
        assert set(row["systems"]) == {"hf_peft", *bench.GRAPHS, bench.F_LINEAR}
        for figures in row["systems"].values():
            assert figures["tok_s"] > 0 and len(figures["step_s"]) == 1
        assert row["systems"]["hf_peft"]["vs_hf_peft"] == 1.0
    mixed = next(row for row in document["results"] if row["workload"] == "mixed-2048")
    assert len(set(mixed["seq_lens"])) > 1  # HF trains it padded, the units packed
    assert result.with_suffix(".png").exists()


def test_a_system_training_other_math_fails_the_run(tiny_model, tmp_path, monkeypatch):
    """The same-math check can fail: units whose update differs (a 10^4x learning rate) give
    another second-step loss, and the run exits 1."""
    original = bench.units_step_fn

    def other_update(base, adapter_dir, batch, graph_share, lr):
        return original(base, adapter_dir, batch, graph_share, lr * 1e4)

    monkeypatch.setattr(bench, "units_step_fn", other_update)
    code = bench.main(["--model", str(tiny_model), "--workloads", "1x256", "--length-scale", "0.05",
                       "--repeats", "1", "--rank", "4", "--out-dir", str(tmp_path)])
    assert code == 1
