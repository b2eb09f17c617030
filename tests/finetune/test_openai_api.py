"""The OpenAI Files and Fine-tuning API (#10): file store and job logic without a server, then
the real `openai` client against `vllm serve` on the tiny model."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import pytest

from tests.finetune.api_fakes import (
    api_error,
    jsonl,
    make_jobs,
    run_to_end,
    supervised,
    training_lines,
    upload,
    wait_until,
)
from vllm_slora.finetune.files import FileStore


def test_uploads_are_checked_stored_listed_and_deleted(tmp_path, tiny_model):
    """Not JSONL / wrong shape / mixed formats / empty / too large / bad purpose: refused naming
    the line and problem, nothing stored; a good file round-trips and pages like OpenAI's list."""
    jobs = make_jobs(tmp_path, tiny_model, max_bytes=4096)
    store = jobs.files
    good = jsonl(training_lines())
    cases = {
        b'{"text": "a"}\nnot json\n': (400, "train.jsonl, line 2: not valid JSON"),
        b'{"text": "a"}\n[1, 2]\n': (400, "line 2: expected a JSON object"),
        b'{"text": "a"}\n{"prompt": "p", "completion": "c"}\n': (400, "line 2: prompt/completion format, but line 1"),
        b'{"text": "a"}\n{"prompt": "p"}\n': (400, "line 2: has 'prompt' but no 'completion'"),
        b"": (400, "the file is empty"),
        b"\n\n": (400, "the file is empty"),
        b'{"text": "x"}\n' * 400: (413, "larger than the upload limit of 4096 bytes"),
    }
    for data, (status, needle) in cases.items():
        error = api_error(upload, jobs, data)
        assert error.status == status and needle in error.message, (data[:40], error.message)
        assert error.body()["error"]["param"] == "file"
    error = api_error(upload, jobs, good, purpose="fine-tune-results")
    assert error.status == 400 and "'purpose' must be one of" in error.message
    assert store.list() == ([], False) and not list(store.root.glob(".*"))  # nothing kept of refused uploads

    first = upload(jobs, good, name="../../etc/train.jsonl")
    second = upload(jobs, b"anything", name="notes.txt", purpose="user_data")  # other purposes: stored as is
    assert first.filename == "train.jsonl" and first.bytes == len(good) and first.to_openai()["object"] == "file"
    assert store.content_path(first.id).read_bytes() == good
    newest = sorted([first, second], key=lambda f: (f.created_at, f.id), reverse=True)
    assert store.list() == (newest, False)
    assert store.list(limit=1) == (newest[:1], True)
    assert store.list(after=newest[0].id) == (newest[1:], False)
    assert store.list(purpose="fine-tune") == ([first], False)
    assert FileStore(store.root, 4096).get(first.id) == first  # records survive a restart
    store.delete(second.id)
    assert api_error(store.get, second.id).status == 404
    assert api_error(store.delete, second.id).status == 404


def test_job_trains_publishes_each_version_and_reports_steps(tmp_path, tiny_model):
    """A job serves version 0 (B = 0) at creation, then publishes every publish_every steps and at
    the end (in place + `:step-N`); its final adapter equals LoraTrainer's on the same data/seed."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from vllm_slora.finetune import LoraParams, LoraSettings, LoraTrainer, TrainingSettings
    from vllm_slora.finetune.base_weights import base_weights_from_checkpoint
    from vllm_slora.finetune.data import load_training_file
    from vllm_slora.finetune.packing import pack_examples

    jobs = make_jobs(tmp_path, tiny_model)
    stored = upload(jobs, jsonl(training_lines()))
    body = {"model": "default", "training_file": stored.id, "suffix": "bot", "seed": 7,
            "method": supervised(max_steps=5, publish_every=2, learning_rate_multiplier=25, batch_tokens=40,
                                 lora_rank=4, target_modules=["q_proj", "v_proj", "down_proj"])}

    async def scenario():
        job = await jobs.create(body)
        assert job["status"] in ("queued", "running") and job["model"] == "base"
        assert job["fine_tuned_model"] == f"ft:base:bot:{job['id'][-8:]}"
        assert jobs.host.loads[0] == (job["fine_tuned_model"], str(tmp_path / "jobs" / job["id"] / "step-0"), False)
        await wait_until(lambda: jobs.retrieve(job["id"])["status"] == "succeeded")
        return jobs.retrieve(job["id"])

    job = asyncio.run(scenario())
    name, job_dir = job["fine_tuned_model"], tmp_path / "jobs" / job["id"]
    steps = [(2, True), (4, True), (5, True)]
    expected = [(name, str(job_dir / "step-0"), False)]
    for step, _ in steps:
        expected += [(name, str(job_dir / f"step-{step}"), True), (f"{name}:step-{step}", str(job_dir / f"step-{step}"), False)]
    assert jobs.host.loads == expected
    step0 = load_file(str(job_dir / "step-0" / "adapter_model.safetensors"))
    assert all(not t.any() for k, t in step0.items() if "lora_B" in k)  # version 0 = the base model

    hyper = job["method"]["supervised"]["hyperparameters"]
    assert job["hyperparameters"] == {"n_epochs": hyper["n_epochs"], "batch_size": "auto",
                                      "learning_rate_multiplier": 25.0}
    assert hyper["learning_rate"] == pytest.approx(25 * 2e-4) and hyper["lora_rank"] == 4 and hyper["max_steps"] == 5
    assert job["finished_at"] and job["error"] is None and job["trained_tokens"] > 0 and job["seed"] == 7

    events, more = jobs.events(job["id"], limit=100)
    assert not more and events[0]["message"].startswith("Fine-tuning job succeeded")  # newest first
    metrics = [e["data"] for e in reversed(events) if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(m["train_loss"]) and m["learning_rate"] == pytest.approx(5e-3) and m["step_seconds"] > 0
               for m in metrics)
    assert metrics[-1]["trained_tokens"] == job["trained_tokens"]
    page, more = jobs.events(job["id"], limit=3)
    assert more and jobs.events(job["id"], after=page[-1]["id"], limit=100)[0] == events[3:]

    checkpoints, _ = jobs.checkpoints(job["id"])
    assert [c["step_number"] for c in checkpoints] == [5, 4, 2]
    assert checkpoints[0]["fine_tuned_model_checkpoint"] == f"{name}:step-5"
    assert checkpoints[0]["metrics"]["train_loss"] == metrics[-1]["train_loss"]
    (results,) = job["result_files"]
    assert jobs.files.get(results).purpose == "fine-tune-results"
    assert jobs.files.content_path(results).read_text().count("\n") == 6  # header + 5 steps

    # The same training done directly: identical final weights.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = load_training_file(jobs.files.content_path(stored.id), tokenizer, max_length=40)
    base = base_weights_from_checkpoint(tiny_model, dtype=torch.float32)
    lora = LoraParams.init(base.config, LoraSettings(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj")),
                           seed=7)
    LoraTrainer(base, lora, TrainingSettings(max_steps=5, lr=5e-3)).train(pack_examples(examples, 40))
    final = load_file(str(job_dir / "step-5" / "adapter_model.safetensors"))
    assert final.keys() == lora.peft_state_dict().keys()
    assert all(torch.allclose(final[k], v, rtol=1e-5, atol=1e-7) for k, v in lora.peft_state_dict().items())

    # Continue training from a loaded adapter: its weights are version 0 of the new job.
    jobs.host.adapters["mine"] = str(job_dir / "step-5")

    async def continued():
        error = await _create_error(jobs, {"model": "mine", "training_file": stored.id,
                                           "method": supervised(lora_rank=8)})
        assert error.status == 400 and "whose LoRA settings are kept" in error.message
        job = await jobs.create({"model": "mine", "training_file": stored.id, "method": supervised(max_steps=1)})
        await wait_until(lambda: jobs.retrieve(job["id"])["status"] == "succeeded")
        return job

    second = asyncio.run(continued())
    assert second["fine_tuned_model"] == f"ft:mine:{second['id'][-8:]}"
    start = load_file(str(tmp_path / "jobs" / second["id"] / "step-0" / "adapter_model.safetensors"))
    assert all(torch.equal(start[k], v) for k, v in final.items())
    assert [j["id"] for j in jobs.list()[0]] == [second["id"], job["id"]]  # newest first
    jobs.close()


@pytest.mark.parametrize("where", ["server-thread", "engine-worker"])
def test_a_validation_file_gives_every_published_version_its_hf_peft_validation_loss(tmp_path, tiny_model, where):
    """With validation_file, each published version's loss over the whole validation set (no
    dropout) equals HF + PEFT's on the published files: as a metrics event, in the checkpoint's
    metrics and in the results file; the job reports its validation_file. Both training paths:
    the server's own thread (no engine) and the engine's worker (forward-only units)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tests.finetune.inprocess_engine import InProcessEngine
    from tests.finetune.peft_reference import hf_micro_batch_loss, load_hf
    from vllm_slora.finetune.data import load_training_file

    engine = InProcessEngine(tiny_model) if where == "engine-worker" else None
    jobs = make_jobs(tmp_path, tiny_model, engine_call=engine and engine.call)
    stored = upload(jobs, jsonl(training_lines()))
    held_out = [{"prompt": "the quick", "completion": " fox naps ."},
                {"prompt": "many adapters", "completion": " share one pool ."},
                {"prompt": "unified paging keeps", "completion": " the kv cache and adapters together ."}]
    validation = upload(jobs, jsonl(held_out), name="valid.jsonl")
    body = {"model": "base", "training_file": stored.id, "validation_file": validation.id, "seed": 3,
            "method": supervised(max_steps=4, publish_every=2, learning_rate_multiplier=25, batch_tokens=40,
                                 lora_rank=4, lora_dropout=0.2)}
    job = run_to_end(jobs, body)
    assert job["status"] == "succeeded" and job["validation_file"] == validation.id
    job_dir = tmp_path / "jobs" / job["id"]
    events, _ = jobs.events(job["id"], limit=100)
    validated = [e["data"] for e in reversed(events) if e["type"] == "metrics" and "full_valid_loss" in e["data"]]
    assert [v["step"] for v in validated] == [2, 4]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = load_training_file(jobs.files.content_path(validation.id), tokenizer, max_length=256)
    assert all(v["valid_loss_tokens"] == sum(e.num_loss_tokens for e in examples) for v in validated)
    import torch

    for v in validated:
        with torch.no_grad():
            peft = PeftModel.from_pretrained(load_hf(tiny_model), str(job_dir / f"step-{v['step']}"))
            reference = hf_micro_batch_loss(peft.eval(), examples).item()
        assert v["full_valid_loss"] == pytest.approx(reference, rel=1e-5)
    checkpoints = {c["step_number"]: c["metrics"] for c in jobs.checkpoints(job["id"])[0]}
    assert {step: m["full_valid_loss"] for step, m in checkpoints.items()} == {v["step"]: v["full_valid_loss"]
                                                                            for v in validated}
    (results,) = job["result_files"]
    rows = jobs.files.content_path(results).read_text().splitlines()
    assert rows[0].endswith(",full_valid_loss")
    assert [row.rsplit(",", 1)[1] != "" for row in rows[1:]] == [False, True, False, True]
    jobs.close()
    if engine is not None:
        engine.stop()


@pytest.mark.parametrize("where", ["server-thread", "engine-worker"])
def test_batch_size_steps_accumulate_micro_batches_and_train_as_hf_peft_does(tmp_path, tiny_model, where,
                                                                             monkeypatch):
    """batch_size examples per optimizer step, packed into batch_tokens-token micro-batches whose
    gradients are accumulated: the loss curve and the final weights equal an HF + PEFT AdamW
    loop that takes each step's examples at once (the memory stays that of one micro-batch)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from tests.finetune.inprocess_engine import InProcessEngine
    from tests.finetune.peft_reference import hf_adamw_loss_curve, load_hf, peft_key, peft_model_like
    from vllm_slora.finetune import trainer
    from vllm_slora.finetune.coserve_worker import BATCHES_FILE
    from vllm_slora.finetune.data import load_training_file
    from vllm_slora.finetune.lora_params import LoraParams
    from vllm_slora.finetune.model_config import DecoderConfig
    from vllm_slora.finetune.packing import load_steps, step_micro_batches, step_totals

    trained_tokens = []  # the size of every micro-batch the server's thread trains on
    packed_loss = trainer.packed_loss
    monkeypatch.setattr(trainer, "packed_loss", lambda *a, **k: trained_tokens.append(a[2].numel()) or packed_loss(*a, **k))
    engine = InProcessEngine(tiny_model) if where == "engine-worker" else None
    jobs = make_jobs(tmp_path, tiny_model, engine_call=engine and engine.call)
    stored = upload(jobs, jsonl(training_lines()))
    body = {"model": "base", "training_file": stored.id, "seed": 5,
            "method": supervised(batch_size=3, batch_tokens=24, max_length=24, max_steps=6, publish_every=3,
                                 learning_rate_multiplier=25, lora_rank=4)}
    job = run_to_end(jobs, body)
    assert job["status"] == "succeeded", job["error"]
    job_dir = tmp_path / "jobs" / job["id"]
    examples = load_training_file(jobs.files.content_path(stored.id), AutoTokenizer.from_pretrained(tiny_model),
                                  max_length=24)
    steps = step_micro_batches(examples, 3, 24)
    assert all(len(step) >= 2 for step in steps)  # every step's examples need several micro-batches
    if engine is None:
        assert 0 < max(trained_tokens) <= 24
    else:  # what the engine's worker trains on
        sizes = [[b.num_tokens for b in step] for step in load_steps(job_dir / BATCHES_FILE)]
        assert sizes == [[b.num_tokens for b in step] for step in steps]
    events, _ = jobs.events(job["id"], limit=100)
    metrics = [e["data"] for e in reversed(events) if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert [m["step_tokens"] for m in metrics] == [step_totals(steps[i % len(steps)])[0] for i in range(6)]

    lora = LoraParams.from_peft_dir(job_dir / "step-0", DecoderConfig.from_hf(tiny_model))
    peft = peft_model_like(load_hf(tiny_model), lora)
    curve = hf_adamw_loss_curve(peft, lora, examples, steps, steps=6, lr=25 * 2e-4)
    assert [m["train_loss"] for m in metrics] == pytest.approx(curve, rel=1e-4)
    final = load_file(str(job_dir / "step-6" / "adapter_model.safetensors"))
    live = dict(peft.named_parameters())
    for key, value in final.items():
        torch.testing.assert_close(value, live[peft_key(key)].detach(), rtol=1e-3, atol=1e-5)
    jobs.close()
    if engine is not None:
        engine.stop()


async def _create_error(jobs, body):
    from vllm_slora.finetune.files import ApiError

    try:
        await jobs.create(body)
    except ApiError as e:
        return e
    raise AssertionError(f"accepted: {body}")


def test_create_refuses_bad_requests_naming_the_problem(tmp_path, tiny_model):
    jobs = make_jobs(tmp_path, tiny_model)
    good = upload(jobs, jsonl(training_lines())).id
    other = upload(jobs, b"x", purpose="user_data").id
    long_line = upload(jobs, jsonl(training_lines() + [{"prompt": " ".join(["word"] * 300), "completion": " end"}])).id
    cases = [
        ({"model": "base", "training_file": "file-nope"}, "training_file 'file-nope': no such file"),
        ({"model": "base", "training_file": other}, "has purpose 'user_data'"),
        ({"model": "nope", "training_file": good}, "model 'nope' is not served here: fine-tune one of 'base', 'other'"),
        ({"training_file": good}, "'model' is required"),
        ({"model": "base", "training_file": good, "method": supervised(lora_rank=16)},
         "LoRA rank 16 is greater than the server's --max-lora-rank 8"),
        ({"model": "base", "training_file": good, "method": supervised(lora_rnak=4)},
         "unknown hyperparameter 'method.supervised.hyperparameters.lora_rnak'"),
        ({"model": "base", "training_file": good, "method": supervised(batch_size=2, batch_tokens=16, max_length=64)},
         "max_length 64 exceeds batch_tokens 16"),
        ({"model": "base", "training_file": good, "hyperparameters": {"n_epochs": 2},
          "method": supervised(n_epochs=3)}, "contradicts hyperparameters.n_epochs = 2"),
        ({"model": "base", "training_file": good, "method": supervised(n_epochs=0)}, "must be a positive integer"),
        ({"model": "base", "training_file": good, "slora": {"target_modules": ["lm_head"]}},
         "slora.target_modules must be a non-empty list"),
        ({"model": "base", "training_file": good, "method": {"type": "dpo"}}, "method.type 'dpo' is not supported"),
        ({"model": "base", "training_file": good, "suffix": "a b"}, "'suffix' must be 1-64 characters"),
        ({"model": "base", "training_file": good, "validation_file": "file-nope"},
         "validation_file 'file-nope': no such file"),
        ({"model": "base", "training_file": good, "validation_file": other}, "validation_file"),
        ({"model": "base", "training_file": good, "validation_file": 5}, "'validation_file' must be the id"),
        ({"model": "base", "training_file": good, "integrations": [{"type": "wandb"}]},
         "'integrations' is not supported"),
        ({"model": "base", "training_file": long_line}, "line 7: "),
        ({"model": "base", "training_file": good, "method": supervised(max_length=1000)},
         "between 2 and the served max_model_len 256"),
    ]

    async def scenario():
        for body, needle in cases:
            error = await _create_error(jobs, body)
            assert error.status == 400 and needle in error.message, (body, error.message)
        assert "longer than max_length 256" in (await _create_error(jobs, {"model": "base", "training_file": long_line})).message
        error = await _create_error(jobs, {"model": "base", "training_file": good, "validation_file": long_line})
        assert error.body()["error"]["param"] == "validation_file" and "line 7: " in error.message
        assert error.body()["error"]["code"] == "invalid_validation_file"
        error = await _create_error(jobs, {"model": "base", "training_file": good, "validation_file": other})
        assert error.body()["error"]["param"] == "validation_file" and "has purpose 'user_data'" in error.message
        for engine, needle in (
            (dict(tensor_parallel_size=2), "not supported with tensor_parallel_size=2"),
            (dict(max_lora_rank=None), "without --enable-lora"),
            (dict(quantization="awq"), "quantized base model (awq)"),
        ):
            other_jobs = make_jobs(tmp_path / str(len(needle)), tiny_model, **engine)
            file_id = upload(other_jobs, jsonl(training_lines())).id
            error = await _create_error(other_jobs, {"model": "base", "training_file": file_id})
            assert error.status == 400 and needle in error.message, error.message
        jobs.host.refuse = "engine says no"
        error = await _create_error(jobs, {"model": "base", "training_file": good})
        assert error.status == 400 and "could not serve the initial adapter" in error.message

    asyncio.run(scenario())
    assert jobs.list() == ([], False) and jobs.host.loads == []
    assert not any((tmp_path / "jobs").iterdir())
    assert api_error(jobs.retrieve, "ftjob-nope").status == 404


def test_nan_loss_fails_the_job_and_the_last_version_keeps_serving(tmp_path, tiny_model, monkeypatch):
    from vllm_slora.finetune import trainer

    original = trainer.LoraTrainer.step

    def step(self, batch):
        record = original(self, batch)
        if record.step == 3:
            record.loss = float("nan")
        return record

    monkeypatch.setattr(trainer.LoraTrainer, "step", step)
    jobs = make_jobs(tmp_path, tiny_model)
    stored = upload(jobs, jsonl(training_lines()))
    job = run_to_end(jobs, {"model": "base", "training_file": stored.id,
                            "method": supervised(max_steps=6, publish_every=2)})
    assert job["status"] == "failed" and job["error"]["code"] == "training_diverged"
    assert "training loss is nan at step 3" in job["error"]["message"]
    assert f"{job['fine_tuned_model']} keeps serving step 2" in job["error"]["message"]
    assert [load[0] for load in jobs.host.loads] == [job["fine_tuned_model"]] * 2 + [f"{job['fine_tuned_model']}:step-2"]
    assert jobs.events(job["id"])[0][0]["level"] == "error"
    jobs.close()


def test_jobs_queue_and_cancel(tmp_path, tiny_model):
    """One job trains at a time; a queued job cancels at once, a running one after its step and
    publishes nothing more; cancelling a finished job is a 400."""
    jobs = make_jobs(tmp_path, tiny_model)
    stored = upload(jobs, jsonl(training_lines()))
    long = {"model": "base", "training_file": stored.id, "method": supervised(max_steps=10**6, publish_every=3)}

    async def scenario():
        first = await jobs.create(long)
        second = await jobs.create(long)
        await wait_until(lambda: len(jobs.checkpoints(first["id"])[0]) >= 2)
        assert jobs.retrieve(first["id"])["status"] == "running"
        assert jobs.retrieve(second["id"])["status"] == "queued"
        cancelled = jobs.cancel(second["id"])
        assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
        assert jobs.cancel(first["id"])["status"] == "cancelled"
        await wait_until(lambda: jobs.retrieve(first["id"])["finished_at"] is not None)
        loads = len(jobs.host.loads)
        await asyncio.sleep(0.3)
        assert len(jobs.host.loads) == loads  # nothing published after the cancel took effect
        return first, second

    first, second = asyncio.run(scenario())
    assert jobs.retrieve(second["id"])["trained_tokens"] == 0
    assert [n for n, _, _ in jobs.host.loads].count(second["fine_tuned_model"]) == 1  # version 0 only
    published = jobs.checkpoints(first["id"])[0][0]["step_number"]
    assert jobs.events(first["id"])[0][0]["message"].endswith(f"keeps serving step {published}")
    error = api_error(jobs.cancel, first["id"])
    assert error.status == 400 and "has already cancelled" in error.message
    jobs.close()


def test_a_paused_job_trains_no_step_until_resumed_and_ends_with_the_same_weights(tmp_path, tiny_model):
    """Paused after its first step: no step while paused (its versions keep serving), pausing
    twice or resuming a running job is a 400; resumed, it ends with the weights of a job that
    never paused."""
    from safetensors.torch import load_file

    jobs = make_jobs(tmp_path, tiny_model)
    stored = upload(jobs, jsonl(training_lines()))
    body = {"model": "base", "training_file": stored.id, "seed": 3,
            "method": supervised(max_steps=6, publish_every=3, batch_tokens=40, lora_rank=4)}

    async def scenario():
        straight = await jobs.create(body)
        await wait_until(lambda: jobs.retrieve(straight["id"])["status"] == "succeeded")
        job = await jobs.create(body)
        await wait_until(lambda: jobs.retrieve(job["id"])["trained_tokens"] > 0)
        assert jobs.pause(job["id"])["status"] == "paused"
        await asyncio.sleep(0.5)  # the step in progress ends
        tokens = jobs.retrieve(job["id"])["trained_tokens"]
        await asyncio.sleep(1.0)
        assert jobs.retrieve(job["id"])["trained_tokens"] == tokens
        assert jobs.retrieve(job["id"])["status"] == "paused"
        again = api_error(jobs.pause, job["id"])
        assert again.status == 400 and "is paused and cannot be paused (only queued or running jobs can)" in again.message
        assert jobs.resume(job["id"])["status"] == "running"
        not_paused = api_error(jobs.resume, job["id"])
        assert not_paused.status == 400 and "is running and cannot be resumed (only paused jobs can)" in not_paused.message
        await wait_until(lambda: jobs.retrieve(job["id"])["status"] == "succeeded")
        return straight, job

    straight, job = asyncio.run(scenario())
    messages = [e["message"] for e in reversed(jobs.events(job["id"], limit=100)[0])]
    assert any(m.startswith("Job paused after step") for m in messages) and any(
        m.startswith("Job resumed at step") for m in messages)
    finals = [load_file(str(tmp_path / "jobs" / j["id"] / "step-6" / "adapter_model.safetensors")) for j in (straight, job)]
    assert finals[0].keys() == finals[1].keys() and all(finals[0][k].equal(finals[1][k]) for k in finals[0])
    error = api_error(jobs.pause, job["id"])
    assert error.status == 400 and "is succeeded and cannot be paused" in error.message
    jobs.close()


# -- through the server ---------------------------------------------------------------------------
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    from vllm_slora.server_process import ServerProcess

    root = tmp_path_factory.mktemp("finetune-server")
    args = [
        "--served-model-name", "base", "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
        "--kv-cache-memory-bytes", str(256 << 20), "--enable-lora", "--max-lora-rank", "8",
        "--additional-config", json.dumps({"slora": {"finetune": True}}),
        # The tiny tokenizer has none; chat requests need one.
        "--chat-template", CHAT_TEMPLATE,
    ]
    with ServerProcess(tiny_model, args, env={"VLLM_SLORA_FINETUNE_DIR": str(root)}) as srv:
        yield srv


def _tokens(client, model: str, prompt: list[int], max_tokens: int = 8) -> list[int]:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                    extra_body={"return_token_ids": True})
    return list(out.choices[0].token_ids)


def _coserve(server) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{server.openai_base_url}/fine_tuning/coserve", timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.engine
def test_openai_client_uploads_finetunes_and_serves_every_version(server, tiny_model, tmp_path):
    import openai
    from openai import OpenAI
    from transformers import AutoTokenizer

    from tests.hf_reference import hf_greedy, trim_after_eos

    client = OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0, timeout=120)
    train = tmp_path / "train.jsonl"
    train.write_bytes(jsonl(training_lines()))
    with open(train, "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == train.stat().st_size
    assert client.files.retrieve(uploaded.id).filename == "train.jsonl"
    assert uploaded.id in {f.id for f in client.files.list()}
    assert client.files.content(uploaded.id).content == train.read_bytes()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    eos = {tokenizer.eos_token_id}
    prompt = tokenizer("the quick brown")["input_ids"]
    base_tokens = _tokens(client, "base", prompt)

    valid = tmp_path / "valid.jsonl"
    valid.write_bytes(jsonl(training_lines()[:3]))
    with open(valid, "rb") as f:
        validation = client.files.create(file=f, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="default", training_file=uploaded.id, validation_file=validation.id, suffix="tiny-bot", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "max_steps": 6, "publish_every": 2, "learning_rate_multiplier": 50, "batch_tokens": 64}}},
    )
    name = job.fine_tuned_model
    assert name == f"ft:base:tiny-bot:{job.id[-8:]}" and job.model == "base"
    # Servable at once: version 0 (answers as the base model) or, the engine switching to a new
    # version in the step that publishes it, whichever step was already published (checked below).
    at_once = trim_after_eos(_tokens(client, name, prompt), eos)
    assert name in {m.id for m in client.models.list()}
    deadline = time.monotonic() + 120
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "job did not finish"
        _tokens(client, name, prompt, max_tokens=2)  # served whatever version is current
    assert job.status == "succeeded", job.error

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e.data for e in reversed(events) if e.type == "metrics" and "train_loss" in e.data]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all({"train_loss", "learning_rate", "trained_tokens", "step_seconds"} <= m.keys() for m in metrics)
    # In-engine steps also tell how many of the model's layers kept their graphs (no recompute).
    assert all(m["layers"] == 2 and 0 <= m["graph_layers_at_end"] <= m["graph_layers"] <= 2 for m in metrics)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]

    # Every published version validated in the engine (forward-only units) on the validation file.
    assert job.validation_file == validation.id
    validated = {e.data["step"]: e.data["full_valid_loss"] for e in events
                 if e.type == "metrics" and "full_valid_loss" in e.data}
    assert sorted(validated) == [2, 4, 6] and all(math.isfinite(v) for v in validated.values())
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [6, 4, 2]
    assert all(c.metrics.full_valid_loss == validated[c.step_number] for c in checkpoints)
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == [f"{name}:step-{n}" for n in (6, 4, 2)]
    final_dir = {m.id: m.root for m in client.models.list()}[name]
    assert Path(final_dir).name == "step-6"
    served = trim_after_eos(_tokens(client, name, prompt), eos)
    assert served == trim_after_eos(_tokens(client, f"{name}:step-6", prompt), eos)
    assert served == trim_after_eos(hf_greedy(tiny_model, [prompt], 8, adapter_dir=final_dir)[0], eos)
    assert served != trim_after_eos(base_tokens, eos)  # training changed what the model says
    for checkpoint in checkpoints[1:]:
        assert _tokens(client, checkpoint.fine_tuned_model_checkpoint, prompt)
    versions = [trim_after_eos(base_tokens, eos)] + [
        trim_after_eos(hf_greedy(tiny_model, [prompt], 8, adapter_dir=str(Path(final_dir).parent / f"step-{n}"))[0], eos)
        for n in (2, 4, 6)]
    assert at_once in versions

    # A long job: served while it runs, cancelled, its last version keeps serving.
    long = client.fine_tuning.jobs.create(model="base", training_file=uploaded.id,
                                          extra_body={"slora": {"max_steps": 10**6, "publish_every": 3}})
    deadline = time.monotonic() + 60
    while not list(client.fine_tuning.jobs.checkpoints.list(long.id)):
        assert time.monotonic() < deadline, "no checkpoint published"
        time.sleep(0.1)
    assert _tokens(client, long.fine_tuned_model, prompt)
    chat = client.chat.completions.create(model=long.fine_tuned_model, max_tokens=4, temperature=0.0,
                                          messages=[{"role": "user", "content": "the quick brown"}])
    assert chat.model == long.fine_tuned_model and chat.usage.completion_tokens >= 1
    # Co-served: the base model answers exactly as before any job while this one trains.
    assert _tokens(client, "base", prompt) == base_tokens
    assert client.fine_tuning.jobs.retrieve(long.id).status == "running"  # served while training
    started = [e.message for e in client.fine_tuning.jobs.list_events(long.id, limit=100)
               if e.message.startswith("Fine-tuning job started")]
    assert started and "in the engine" in started[0]
    # Paused: the engine runs none of its units (its versions keep serving); resumed: it trains on.
    assert client.fine_tuning.jobs.pause(long.id).status == "paused"
    deadline = time.monotonic() + 60
    while _coserve(server)["paused"] != 1:  # the engine has it paused
        assert time.monotonic() < deadline, "the pause did not reach the engine"
        time.sleep(0.05)
    time.sleep(1.0)  # the events of the step in progress come through (a poll is at most 0.5 s away)
    tokens = client.fine_tuning.jobs.retrieve(long.id).trained_tokens
    time.sleep(1.5)
    paused = client.fine_tuning.jobs.retrieve(long.id)
    assert (paused.status, paused.trained_tokens) == ("paused", tokens)
    assert _tokens(client, long.fine_tuned_model, prompt)
    assert client.fine_tuning.jobs.resume(long.id).status == "running"
    deadline = time.monotonic() + 60
    while client.fine_tuning.jobs.retrieve(long.id).trained_tokens == tokens:
        assert time.monotonic() < deadline, "the resumed job did not train"
        time.sleep(0.1)
    assert _coserve(server)["paused"] == 0
    assert client.fine_tuning.jobs.cancel(long.id).status == "cancelled"
    deadline = time.monotonic() + 60
    while client.fine_tuning.jobs.retrieve(long.id).finished_at is None:
        assert time.monotonic() < deadline, "cancel did not stop the job"
        time.sleep(0.1)
    assert _tokens(client, long.fine_tuned_model, prompt)
    assert [j.id for j in client.fine_tuning.jobs.list()][:2] == [long.id, job.id]

    # Bad inputs: 4xx naming the problem, while a normal completion succeeds beside them.
    async def bad_inputs():
        aclient = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0, timeout=120)

        async def error_of(call):
            try:
                await call
            except openai.APIStatusError as e:
                return e.status_code, e.body["message"] if isinstance(e.body, dict) else str(e.body)
            return 200, "accepted"

        calls = [
            aclient.files.create(file=("bad.jsonl", b'{"text": "a"}\nnot json\n'), purpose="fine-tune"),
            aclient.files.create(file=("empty.jsonl", b""), purpose="fine-tune"),
            aclient.fine_tuning.jobs.create(model="base", training_file="file-unknown"),
            aclient.fine_tuning.jobs.create(model="base", training_file=uploaded.id,
                                            extra_body={"slora": {"lora_rank": 16}}),
            aclient.fine_tuning.jobs.create(model="nope", training_file=uploaded.id),
        ]
        normal = aclient.completions.create(model="base", prompt=prompt, max_tokens=4, temperature=0.0)
        *errors, ok = await asyncio.gather(*map(error_of, calls), normal)
        await aclient.close()
        return errors, ok

    errors, ok = asyncio.run(bad_inputs())
    needles = ["bad.jsonl, line 2: not valid JSON", "empty.jsonl: the file is empty",
               "training_file 'file-unknown': no such file", "LoRA rank 16 is greater than the server's --max-lora-rank 8",
               "model 'nope' is not served here"]
    for (status, message), needle in zip(errors, needles):
        assert status == 400 and needle in message, (status, message)
    assert ok.choices[0].text and ok.usage.completion_tokens >= 1


def test_server_engine_without_finetune_key_refuses_jobs(tmp_path, tiny_model):
    """Jobs train inside the engine only; an engine started without slora.finetune=true cannot, and
    job creation says how to start it (nothing is written, nothing served)."""
    jobs = make_jobs(tmp_path, tiny_model)
    jobs.require_engine = True
    stored = upload(jobs, jsonl(training_lines()))
    error = api_error(jobs.create, {"model": "base", "training_file": stored.id})
    assert error.status == 400 and "slora.finetune=true" in error.message
    assert jobs.list() == ([], False) and jobs.host.loads == []


@pytest.mark.engine
def test_operator_changes_the_training_share_while_serving(server):
    """GET/POST /v1/fine_tuning/coserve: the engine's slack changes without a restart, bad
    settings are refused naming the problem, and requests keep being served."""
    import httpx

    url = server.openai_base_url + "/fine_tuning/coserve"
    state = httpx.get(url, timeout=60).json()
    assert state["object"] == "fine_tuning.coserve" and state["slack"] == pytest.approx(0.05)  # the default
    assert {"steps", "units", "loan_blocks", "active"} <= set(state)
    try:
        changed = httpx.post(url, json={"slack": 0.35}, timeout=60)
        assert changed.status_code == 200 and changed.json()["slack"] == pytest.approx(0.35)
        assert httpx.get(url, timeout=60).json()["slack"] == pytest.approx(0.35)
        for body, needle in [({"slack": -1}, "'slack' must be a number in [0, 10]"),
                             ({"slack": "lots"}, "got 'lots'"),
                             ({"slak": 0.2}, "unknown co-serving setting(s) 'slak'"),
                             ([0.2], "must be a JSON object")]:
            refused = httpx.post(url, json=body, timeout=60)
            assert refused.status_code == 400 and needle in refused.json()["error"]["message"], refused.text
        refused = httpx.post(url, content=b"slack=1", timeout=60)
        assert refused.status_code == 400 and "must be JSON" in refused.json()["error"]["message"]
        assert httpx.get(url, timeout=60).json()["slack"] == pytest.approx(0.35)
        served = httpx.post(server.openai_base_url + "/completions", timeout=120,
                            json={"model": "base", "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0.0})
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 2
    finally:
        httpx.post(url, json={"slack": 0.05}, timeout=60)


def test_coserve_settings_need_a_co_serving_engine(tmp_path, tiny_model):
    jobs = make_jobs(tmp_path, tiny_model)
    error = api_error(jobs.coserve, {"slack": 0.5})
    assert error.status == 400 and "slora.finetune=true" in error.message
