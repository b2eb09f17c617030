"""`vllm-slora finetune`: bad arguments refused before any engine starts; a run trains in the
engine and leaves the adapter of every published step, the log and the loss plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.finetune.api_fakes import jsonl, training_lines


def cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_slora.cli", "finetune", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_bad_arguments_are_refused_naming_them(tmp_path, tiny_model):
    missing = cli("--data", tmp_path / "nope.jsonl", "--out", tmp_path / "out", "--base", tiny_model, timeout=120)
    assert missing.returncode == 2 and "--data" in missing.stderr and "no such file" in missing.stderr
    (tmp_path / "train.jsonl").write_bytes(jsonl(training_lines()))
    no_model = cli("--data", tmp_path / "train.jsonl", "--out", tmp_path / "out", "--base", tmp_path, timeout=120)
    assert no_model.returncode == 2 and "not a model folder" in no_model.stderr
    no_validation = cli("--data", tmp_path / "train.jsonl", "--validation-data", tmp_path / "nope.jsonl",
                        "--out", tmp_path / "out", timeout=120)
    assert no_validation.returncode == 2 and "--validation-data" in no_validation.stderr
    bad_rank = cli("--data", tmp_path / "train.jsonl", "--out", tmp_path / "out", "--rank", "0", timeout=120)
    assert bad_rank.returncode == 2 and "--rank" in bad_rank.stderr
    bad_batch = cli("--data", tmp_path / "train.jsonl", "--out", tmp_path / "out", "--batch-size", "0", timeout=120)
    assert bad_batch.returncode == 2 and "--batch-size" in bad_batch.stderr
    assert not (tmp_path / "out").exists()


def hf_file_loss(tiny_model, adapter_dir, path) -> float:
    """HF + PEFT's token-mean loss over every example of a training-format file."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tests.finetune.peft_reference import hf_micro_batch_loss, load_hf
    from vllm_slora.finetune.data import load_training_file

    examples = load_training_file(path, AutoTokenizer.from_pretrained(tiny_model), max_length=64)
    with torch.no_grad():
        return hf_micro_batch_loss(PeftModel.from_pretrained(load_hf(tiny_model), str(adapter_dir)), examples).item()


@pytest.mark.engine
def test_cli_trains_in_the_engine_and_writes_adapters_log_and_plot(tmp_path, tiny_model):
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(training_lines()))
    held_out = tmp_path / "valid.jsonl"
    held_out.write_bytes(jsonl(training_lines()[:2]))
    out = tmp_path / "run"
    done = cli("--data", data, "--validation-data", held_out, "--out", out, "--base", tiny_model, "--steps", 12,
               "--lr", "1e-2", "--batch-tokens", 64, "--publish-every", 6, "--prompt", "the quick", "--max-tokens", 6)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 12 steps" in done.stdout and f"adapter: {out / 'step-12'}" in done.stdout
    for step in (0, 6, 12):
        assert (out / f"step-{step}" / "adapter_model.safetensors").is_file()
    # The held-out file's loss at each published step: the engine's equals HF + PEFT's on those files.
    validated = json.loads((out / "validation_log.json").read_text())
    assert [v["step"] for v in validated] == [6, 12]
    for v in validated:
        assert f"validation loss at step {v['step']}: {v['loss']:.4f}" in done.stdout
        assert v["loss"] == pytest.approx(hf_file_loss(tiny_model, out / f"step-{v['step']}", held_out), rel=1e-4)
    log = json.loads((out / "training_log.json").read_text())
    assert [r["step"] for r in log] == list(range(1, 13)) and log[-1]["loss"] < log[0]["loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    answers = [line.split(":", 1)[1].strip() for line in done.stdout.splitlines() if line.startswith("answer with")]
    assert len(answers) == 2 and answers[0] != answers[1]  # the trained adapter changed the engine's answer
