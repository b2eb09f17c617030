"""The worker's unit loop (no vLLM): how it sizes LOSS units to the step it was granted."""

from __future__ import annotations

import dataclasses

import pytest

from tests.finetune.training_cases import packed_examples
from vllm_slora.finetune import coserve_worker
from vllm_slora.finetune.base_weights import base_weights_from_checkpoint
from vllm_slora.finetune.coserve_worker import BATCHES_FILE, WorkerTraining
from vllm_slora.finetune.layer_units import LOSS, LayerSlicedPass
from vllm_slora.finetune.lora_params import LoraParams, LoraSettings
from vllm_slora.finetune.model_config import DecoderConfig
from vllm_slora.finetune.packing import pack_examples, save_batches
from vllm_slora.finetune.trainer import TrainingSettings
from vllm_slora.step_plan import TrainJobSpec, TrainOrder


@pytest.fixture()
def worker_and_job(tiny_model, tmp_path, monkeypatch):
    config = DecoderConfig.from_hf(tiny_model)
    examples = packed_examples(config.vocab_size)
    batches = pack_examples(examples, batch_tokens=64)
    assert batches[0].num_tokens > 2 * 8
    save_batches(batches, tmp_path / BATCHES_FILE)
    LoraParams.init(config, LoraSettings(r=4, alpha=8.0), seed=0).save_peft(tmp_path / "step-0")
    spec = TrainJobSpec(job_id="job", adapter_name="ft", job_dir=str(tmp_path), init_adapter_dir=str(tmp_path / "step-0"),
                        settings=dataclasses.asdict(TrainingSettings(max_steps=10**6, lr=1e-3)), total_steps=10**6,
                        publish_every=10**6, seed=0, base_model=str(tiny_model))
    worker = WorkerTraining(None, base_model=str(tiny_model), base=base_weights_from_checkpoint(tiny_model))
    monkeypatch.setattr(coserve_worker, "LOSS_CHUNK", 8)  # the tiny batch has a few chunks of 8 rows
    sizes: list[int] = []
    run_unit = LayerSlicedPass.run_unit

    def recording(self, loss_rows=None):
        before = self.loss_rows_left
        kind = run_unit(self, loss_rows)
        if kind == LOSS:
            sizes.append(before - self.loss_rows_left)
        return kind

    monkeypatch.setattr(LayerSlicedPass, "run_unit", recording)
    worker.step(TrainOrder(start=[spec], budget_s=0.0, idle=True))  # one unit: the job starts
    return worker, sizes


def run_pass(worker: WorkerTraining, budget_s: float) -> None:
    steps = worker.jobs["job"].trainer.steps_done
    while worker.jobs["job"].trainer.steps_done == steps:
        worker.step(TrainOrder(budget_s=budget_s, idle=True))
    assert not any(e.kind == "failed" for e in worker.take_events())


def test_an_idle_step_runs_the_whole_loss_in_one_unit_and_a_short_step_small_ones(worker_and_job):
    worker, sizes = worker_and_job
    run_pass(worker, budget_s=0.0)  # nothing timed yet, then one unit per step: LOSS_CHUNK rows each
    rows = sum(sizes)
    assert sizes == [8] * (rows // 8) + ([rows % 8] if rows % 8 else []) and len(sizes) > 1
    per_chunk = worker.unit_seconds[LOSS]
    assert per_chunk > 0

    sizes.clear()
    layers = len(worker.base.layers)
    pass_s = sum(worker.unit_seconds[k] for k in ("fwd", "bwd")) * layers + per_chunk * len(sizes)
    run_pass(worker, budget_s=4 * pass_s)  # ample time: every loss row in one GEMM (the step may
    assert sizes[0] == rows                # go on into the next pass while its time lasts)

    run_pass(worker, budget_s=0.0)  # (the pass the long step may have begun)
    sizes.clear()
    run_pass(worker, budget_s=0.0)  # no time to spare: back to the shortest units
    assert max(sizes) == 8 and sum(sizes) == rows
