"""Jobs that train in the engine, driven by the API's job manager, across a server restart.

The engine side runs in-process (tests/finetune/inprocess_engine.py: the scheduler's planner
and the worker's trainer on the tiny model's checkpoint weights), so the whole driver path
(submit, events, publish, cancel, restore) runs without vLLM.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from safetensors.torch import load_file

from tests.finetune.api_fakes import jsonl, make_jobs, training_lines, upload, wait_until
from tests.finetune.inprocess_engine import InProcessEngine
from vllm_slora.finetune import coserve_worker


@pytest.fixture(autouse=True)
def whole_mlp_units(monkeypatch):
    """MLP units as wide as the micro-batch: the worker sizes them from its timings, and two runs
    that cut a block into different row chunks sum its LoRA gradients in another order (the
    same weights up to rounding, ~1e-6 after 24 AdamW steps); these tests compare weights
    exactly across runs."""
    monkeypatch.setattr(coserve_worker, "MLP_CHUNK", 1 << 20)


BODY = {"model": "base", "seed": 3,
        "slora": {"max_steps": 24, "publish_every": 4, "batch_tokens": 64, "learning_rate": 1e-2}}


def weights(job_dir, step: int) -> dict:
    return load_file(str(job_dir / f"step-{step}" / "adapter_model.safetensors"))


def assert_same_weights(jobs, job_id: str, reference_id: str, step: int = 24) -> None:
    """The two jobs' step-`step` adapters agree to 1e-6 of each tensor's scale."""
    ours, theirs = weights(jobs.root / job_id, step), weights(jobs.root / reference_id, step)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert (ours[key] - theirs[key]).abs().max() <= 1e-6 * theirs[key].abs().max().clamp_min(1e-12), key


async def reference_job(tmp_path, tiny_model):
    """A job of BODY trained to its end without interruption, in an engine of its own; returns
    (jobs, the uploaded file, the job), the engine stopped."""
    engine = InProcessEngine(tiny_model)
    jobs = make_jobs(tmp_path, tiny_model, engine_call=engine.call)
    stored = upload(jobs, jsonl(training_lines()))
    whole = await jobs.create({**BODY, "training_file": stored.id})
    await wait_until(lambda: jobs.retrieve(whole["id"])["status"] == "succeeded")
    engine.stop()
    return jobs, stored, whole


def test_unfinished_job_resumes_after_a_restart_and_ends_where_an_uninterrupted_one_does(tmp_path, tiny_model,
                                                                                          monkeypatch):
    monkeypatch.setattr(coserve_worker, "CHECKPOINT_EVERY_S", 0.0)  # optimizer state at every publish

    async def scenario():
        jobs, stored, whole = await reference_job(tmp_path, tiny_model)

        # The engine dies right after the step-8 checkpoint; the dead server writes nothing more.
        def crash():
            jobs._persist = lambda job: None

        crashing = InProcessEngine(tiny_model, crash_after_publish=8, on_crash=crash)
        jobs.engine_call = crashing.call
        cut = await jobs.create({**BODY, "training_file": stored.id})
        await asyncio.to_thread(crashing.wait_stopped)
        assert not ((jobs.root / cut["id"]) / "step-24").exists()

        # A new server on the same directories.
        engine = InProcessEngine(tiny_model)
        restarted = make_jobs(tmp_path, tiny_model, engine_call=engine.call)
        assert set(await restarted.restore()) == {whole["id"], cut["id"]}
        assert restarted.retrieve(whole["id"])["status"] == "succeeded"
        served = restarted.host.adapters
        assert served[whole["fine_tuned_model"]].endswith("step-24")  # served again after the restart
        assert f"{whole['fine_tuned_model']}:step-12" in served
        await wait_until(lambda: restarted.retrieve(cut["id"])["status"] not in ("queued", "running"))
        job = restarted.retrieve(cut["id"])
        assert job["status"] == "succeeded", job["error"]
        events = list(reversed(restarted.events(cut["id"], limit=500)[0]))  # oldest first
        restart = [e["message"] for e in events].index("Server restarted: resuming from the last checkpoint")
        steps = [e["data"]["step"] for e in events[restart:] if e["data"] and "train_loss" in e["data"]]
        assert steps == list(range(9, 25))  # only what was not done before the crash
        assert served[cut["fine_tuned_model"]].endswith("step-24")
        restarted.close()
        engine.stop()
        # Same data, seed and order: the resumed job ends exactly where the uninterrupted one did.
        assert_same_weights(jobs, cut["id"], whole["id"])

    asyncio.run(scenario())


def test_a_validation_the_restart_cut_short_runs_when_the_job_resumes(tmp_path, tiny_model, monkeypatch):
    """A job with a validation file; the engine dies right after the step-8 checkpoint, so the
    server has no validation loss of the step-8 version on disk. The resumed job validates that
    version first, once, with the loss an uninterrupted job got for it, then goes on validating
    each later version (validation losses themselves are tested against HF + PEFT in
    test_openai_api.py)."""
    monkeypatch.setattr(coserve_worker, "CHECKPOINT_EVERY_S", 0.0)

    def validation_losses(jobs, job_id: str) -> list[tuple[int, float]]:
        events = reversed(jobs.events(job_id, limit=500)[0])  # oldest first
        return [(e["data"]["step"], e["data"]["full_valid_loss"]) for e in events
                if e["data"] and "full_valid_loss" in e["data"]]

    async def scenario():
        engine = InProcessEngine(tiny_model)
        jobs = make_jobs(tmp_path, tiny_model, engine_call=engine.call)
        stored = upload(jobs, jsonl(training_lines()))
        held_out = upload(jobs, jsonl(training_lines()[:3]))
        body = {**BODY, "training_file": stored.id, "validation_file": held_out.id}
        whole = await jobs.create(body)
        await wait_until(lambda: jobs.retrieve(whole["id"])["status"] == "succeeded")
        engine.stop()
        reference = dict(validation_losses(jobs, whole["id"]))
        assert sorted(reference) == list(range(4, 25, 4))

        def crash():
            jobs._persist = lambda job: None

        crashing = InProcessEngine(tiny_model, crash_after_publish=8, on_crash=crash)
        jobs.engine_call = crashing.call
        cut = await jobs.create(body)
        await asyncio.to_thread(crashing.wait_stopped)
        on_disk = json.loads((jobs.root / cut["id"] / "job.json").read_text())  # what a restarted server reads
        assert not [e for e in on_disk["events"] if (e.get("data") or {}).get("step") == 8
                    and "full_valid_loss" in e["data"]]

        engine = InProcessEngine(tiny_model)
        restarted = make_jobs(tmp_path, tiny_model, engine_call=engine.call)
        await restarted.restore()
        await wait_until(lambda: restarted.retrieve(cut["id"])["status"] not in ("queued", "running"))
        assert restarted.retrieve(cut["id"])["status"] == "succeeded"
        losses = validation_losses(restarted, cut["id"])
        after_restart = [step for step, _ in losses if step >= 8]
        assert after_restart == [8, 12, 16, 20, 24]  # the resumed-from version first, each once
        for step, loss in losses:
            assert loss == pytest.approx(reference[step], rel=1e-5), step
        restarted.close()
        engine.stop()

    asyncio.run(scenario())


def test_a_version_published_but_not_recorded_before_a_crash_is_served_after_the_restart(tmp_path, tiny_model):
    """The engine dies right after publishing step 8, before the server records it (nor its
    checkpoint): the step-8 PEFT files are on disk, the record says step 4. A restarted server
    finds them: step 8 becomes a checkpoint (`:step-8`, its training loss from the step's
    metrics event when that was recorded) and what fine_tuned_model serves. Without an engine
    the unfinished job fails, saying it keeps serving step 8."""

    async def scenario():
        jobs = make_jobs(tmp_path, tiny_model)
        stored = upload(jobs, jsonl(training_lines()))

        def crash():
            jobs._persist = lambda job: None

        crashing = InProcessEngine(tiny_model, crash_after_publish=8, crash_on="published", on_crash=crash)
        jobs.engine_call = crashing.call
        cut = await jobs.create({**BODY, "training_file": stored.id})
        await asyncio.to_thread(crashing.wait_stopped)
        on_disk = json.loads((jobs.root / cut["id"] / "job.json").read_text())
        assert on_disk["published_step"] < 8 and (jobs.root / cut["id"] / "step-8" / "adapter_config.json").exists()

        restarted = make_jobs(tmp_path, tiny_model)  # no engine: the job cannot resume here
        await restarted.restore()
        job = restarted.retrieve(cut["id"])
        assert job["status"] == "failed" and "keeps serving step 8" in job["error"]["message"]
        served = restarted.host.adapters
        assert served[cut["fine_tuned_model"]].endswith("step-8")
        assert served[f"{cut['fine_tuned_model']}:step-8"].endswith("step-8")
        checkpoints = {c["step_number"]: c for c in restarted.checkpoints(cut["id"], limit=100)[0]}
        assert 8 in checkpoints and checkpoints[8]["metrics"]["step"] == 8.0
        assert checkpoints[8]["fine_tuned_model_checkpoint"] == f"{cut['fine_tuned_model']}:step-8"
        messages = [e["message"] for e in restarted.events(cut["id"], limit=500)[0]]
        assert any("had been published but not recorded" in m and "serves step 8" in m for m in messages)
        restarted.close()

    asyncio.run(scenario())


def test_engine_jobs_report_steps_publish_and_cancel(tmp_path, tiny_model):
    """The driver thread follows the engine: metrics per step, every published version served in
    place and as `:step-N`, cancel stops the job and keeps its last version; jobs run at once."""
    async def scenario():
        engine = InProcessEngine(tiny_model)
        jobs = make_jobs(tmp_path, tiny_model, engine_call=engine.call)
        stored = upload(jobs, jsonl(training_lines()))
        short = await jobs.create({**BODY, "training_file": stored.id})
        endless = await jobs.create({"model": "base", "training_file": stored.id,
                                     "slora": {"max_steps": 10**6, "publish_every": 5, "batch_tokens": 64}})
        await wait_until(lambda: jobs.retrieve(short["id"])["status"] == "succeeded")
        # Both ran at once (the engine shares its time; the driver may report a poll later).
        await wait_until(lambda: jobs.retrieve(endless["id"])["trained_tokens"] > 0)
        assert jobs.retrieve(endless["id"])["status"] == "running"
        await wait_until(lambda: jobs.checkpoints(endless["id"])[0])
        assert jobs.cancel(endless["id"])["status"] == "cancelled"
        await wait_until(lambda: jobs.retrieve(endless["id"])["finished_at"] is not None)
        published = [c["step_number"] for c in jobs.checkpoints(short["id"], limit=10)[0]]
        assert published == [24, 20, 16, 12, 8, 4]
        loads = [(name, path.rsplit("/", 1)[-1], replace) for name, path, replace in jobs.host.loads
                 if name.startswith(short["fine_tuned_model"])]
        name = short["fine_tuned_model"]
        assert loads[0] == (name, "step-0", False)
        assert (name, "step-24", True) in loads and (f"{name}:step-24", "step-24", False) in loads
        metrics = [e["data"] for e in reversed(jobs.events(short["id"], limit=100)[0])
                   if e["data"] and "train_loss" in e["data"]]
        assert [m["step"] for m in metrics] == list(range(1, 25))
        assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
        last = jobs.checkpoints(endless["id"])[0][0]["fine_tuned_model_checkpoint"]
        assert jobs.host.adapters[endless["fine_tuned_model"]].endswith(last.rsplit(":", 1)[-1])
        assert engine.planner.handle("stats", {})["active"] == 0 and not engine.worker.jobs
        jobs.close()
        engine.stop()

    asyncio.run(scenario())


def test_a_job_beyond_the_engines_slots_waits_queued_and_trains_once_one_frees(tmp_path, tiny_model):
    """With one training slot, a second job stays queued (an event says why) and trains no step
    while the first runs; once the first ends it trains to the end too."""
    async def scenario():
        engine = InProcessEngine(tiny_model, max_jobs=1, step_gap_s=0.01)
        jobs = make_jobs(tmp_path, tiny_model, engine_call=engine.call)
        stored = upload(jobs, jsonl(training_lines()))
        first = await jobs.create({**BODY, "training_file": stored.id})
        second = await jobs.create({**BODY, "training_file": stored.id})
        await wait_until(lambda: any(e["message"].startswith("Waiting for a training slot: 1 job(s)")
                                     for e in jobs.events(second["id"], limit=100)[0]))
        await wait_until(lambda: jobs.retrieve(first["id"])["trained_tokens"] > 0)
        while True:
            # The API follows the engine (its driver polls the job's events): read it first, and
            # hold its figures to account only while the engine, read after it, still runs the first.
            seen = jobs.retrieve(second["id"])
            with engine.between_steps():
                planned = engine.planner.jobs.get(first["id"])
                first_trains = planned is not None and planned.status == "running"
                second_in_worker = second["id"] in engine.worker.jobs
            if not first_trains:
                break
            assert seen["status"] == "queued" and seen["trained_tokens"] == 0 and not second_in_worker
            await asyncio.sleep(0.02)
        await wait_until(lambda: jobs.retrieve(first["id"])["status"] == "succeeded")
        await wait_until(lambda: jobs.retrieve(second["id"])["status"] == "succeeded")
        assert jobs.retrieve(second["id"])["trained_tokens"] == jobs.retrieve(first["id"])["trained_tokens"]
        assert_same_weights(jobs, second["id"], first["id"])  # same data and seed, trained alone alike
        jobs.close()
        engine.stop()

    asyncio.run(scenario())


def test_a_job_resumed_from_before_its_last_version_trains_those_steps_again_and_counts_them_once(
        tmp_path, tiny_model, monkeypatch):
    """Optimizer state is written at most every CHECKPOINT_EVERY_S: a server that dies after
    publishing step 8 with no optimizer state on disk yet resumes from step 0. The steps it
    trains again give the same versions (same data, seed, order), replace their checkpoint
    entries instead of adding to them, and count once in trained_tokens; the job ends where
    an uninterrupted one does."""
    monkeypatch.setattr(coserve_worker, "CHECKPOINT_EVERY_S", float("inf"))  # only after the last step

    async def scenario():
        jobs, stored, whole = await reference_job(tmp_path, tiny_model)

        # The engine stops stepping right after publishing step 8; once the server has recorded
        # that version, it dies and the dead server writes nothing more.
        crashing = InProcessEngine(tiny_model, crash_after_publish=8, crash_on="published", freeze=True)
        jobs.engine_call = crashing.call
        cut = await jobs.create({**BODY, "training_file": stored.id})
        await asyncio.to_thread(crashing.wait_stopped)
        await wait_until(lambda: any(c["step_number"] == 8 for c in jobs.checkpoints(cut["id"])[0]))
        jobs._persist = lambda job: None
        crashing.stop()
        cut_dir = jobs.root / cut["id"]
        assert (cut_dir / "step-8").exists() and not (cut_dir / coserve_worker.TRAINER_STATE).exists()

        engine = InProcessEngine(tiny_model)
        restarted = make_jobs(tmp_path, tiny_model, engine_call=engine.call)
        await restarted.restore()
        before = restarted.retrieve(cut["id"])
        assert [c["step_number"] for c in restarted.checkpoints(cut["id"], limit=20)[0]] == [8, 4]
        await wait_until(lambda: restarted.retrieve(cut["id"])["status"] not in ("queued", "running"))
        job = restarted.retrieve(cut["id"])
        assert job["status"] == "succeeded", job["error"]
        events = list(reversed(restarted.events(cut["id"], limit=500)[0]))
        restart = [e["message"] for e in events].index("Server restarted: resuming from step 0")
        steps = [e["data"]["step"] for e in events[restart:] if e["data"] and "train_loss" in e["data"]]
        assert steps == list(range(1, 25))  # steps 1..8 trained again
        assert [c["step_number"] for c in restarted.checkpoints(cut["id"], limit=20)[0]] == [24, 20, 16, 12, 8, 4]
        reference = restarted.retrieve(whole["id"])
        assert before["trained_tokens"] > 0
        assert job["trained_tokens"] == reference["trained_tokens"]  # steps 1..8 counted once
        restarted.close()
        engine.stop()
        assert_same_weights(jobs, cut["id"], whole["id"])

    asyncio.run(scenario())


def test_a_paused_job_stays_paused_across_a_restart_and_resumed_ends_where_an_uninterrupted_one_does(
        tmp_path, tiny_model, monkeypatch):
    """Paused mid-job (its engine steps are slowed so that the pause lands mid-job), the server
    goes down; the restarted one hands the job to its engine paused: no step until resumed,
    then it ends with the weights and trained_tokens of a job that never paused (steps the
    engine trained after the old server's last record count once)."""
    monkeypatch.setattr(coserve_worker, "CHECKPOINT_EVERY_S", 0.0)  # optimizer state at every publish

    async def scenario():
        jobs, stored, whole = await reference_job(tmp_path, tiny_model)

        engine = InProcessEngine(tiny_model, step_gap_s=0.05)
        jobs.engine_call = engine.call
        paused = await jobs.create({**BODY, "training_file": stored.id})
        await wait_until(lambda: jobs.checkpoints(paused["id"])[0])  # past its first checkpoint
        assert jobs.pause(paused["id"])["status"] == "paused"
        await wait_until(lambda: paused["id"] in engine.worker.paused)  # the engine has paused it
        engine.stop()  # the server goes down with the job paused; the dead one writes nothing more
        jobs._persist = lambda job: None

        engine = InProcessEngine(tiny_model)
        restarted = make_jobs(tmp_path, tiny_model, engine_call=engine.call)
        await restarted.restore()
        assert restarted.retrieve(paused["id"])["status"] == "paused"
        await wait_until(lambda: paused["id"] in engine.worker.paused)  # handed over paused
        worker_job = engine.worker.jobs[paused["id"]]
        assert 4 <= worker_job.trainer.steps_done < 24  # from its last checkpoint
        await asyncio.sleep(0.5)
        tokens, steps = restarted.retrieve(paused["id"])["trained_tokens"], worker_job.trainer.steps_done
        await asyncio.sleep(0.5)
        assert (restarted.retrieve(paused["id"])["trained_tokens"], worker_job.trainer.steps_done) == (tokens, steps)
        assert restarted.resume(paused["id"])["status"] in ("queued", "running")
        await wait_until(lambda: restarted.retrieve(paused["id"])["status"] not in ("queued", "running"))
        job = restarted.retrieve(paused["id"])
        assert job["status"] == "succeeded", job["error"]
        assert job["trained_tokens"] == restarted.retrieve(whole["id"])["trained_tokens"]
        messages = [e["message"] for e in restarted.events(paused["id"], limit=500)[0]]
        assert "Server restarted: the job stays paused (it resumes from the last checkpoint)" in messages
        restarted.close()
        engine.stop()
        assert_same_weights(jobs, paused["id"], whole["id"])

    asyncio.run(scenario())


def test_a_pause_the_engine_refuses_does_not_fail_the_job(tmp_path, tiny_model):
    """A job that ends in the engine just as it is paused: the engine refuses the pause (the
    job is gone there); the job still ends as the engine says, not failed."""
    from vllm_slora.finetune.coserve_planner import TrainingRefused

    async def scenario():
        engine = InProcessEngine(tiny_model, step_gap_s=0.02)

        async def refusing_pause(action, payload):
            if action == "pause":
                raise TrainingRefused(f"job {payload['job_id']} has finished; it can no longer be paused")
            return await engine.call(action, payload)

        jobs = make_jobs(tmp_path, tiny_model, engine_call=refusing_pause)
        stored = upload(jobs, jsonl(training_lines()))
        job = await jobs.create({**BODY, "training_file": stored.id})
        await wait_until(lambda: jobs.retrieve(job["id"])["trained_tokens"] > 0)
        assert jobs.pause(job["id"])["status"] == "paused"
        await wait_until(lambda: jobs.retrieve(job["id"])["status"] != "paused")
        done = jobs.retrieve(job["id"])
        assert done["status"] == "succeeded" and done["error"] is None, done
        jobs.close()
        engine.stop()

    asyncio.run(scenario())


def test_a_publish_after_the_servers_loop_stopped_fails_at_once(tmp_path, tiny_model):
    """The server shutting down: its loop has stopped (not yet closed). A publish from a training
    thread must fail at once, naming why, rather than wait PUBLISH_TIMEOUT_S for a loop that will
    never run it (and leave the coroutine unawaited)."""
    import time

    from vllm_slora.finetune.jobs import _PublishFailed

    jobs = make_jobs(tmp_path, tiny_model)
    loop = asyncio.new_event_loop()
    try:
        jobs._loop = loop
        load = jobs.host.load("base-ft", str(tmp_path), replace=True)
        started = time.monotonic()
        with pytest.raises(_PublishFailed, match="event loop is not running"):
            jobs._on_loop(load)
        assert time.monotonic() - started < 5
        assert load.cr_frame is None  # closed, not left unawaited
        assert jobs.host.loads == []
    finally:
        loop.close()
