"""Co-served finetuning inside a running engine (#10), on the tiny model, fp32.

One engine with slora.finetune=true. Jobs go through the EngineCore utility
`slora_finetune` (what the server's fine-tuning API and `finetune_in_engine` use); they
train in the worker on the engine's own weights, in the time inference leaves.
"""

from __future__ import annotations

import time

import pytest

from tests.engines import close_llm, make_llm
from tests.finetune.peft_reference import hf_adamw_loss_curve, load_hf, peft_model_like
from tests.finetune.training_cases import write_training_file

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm(tiny_model):
    engine = make_llm(tiny_model, slora={"finetune": True}, max_model_len=256)
    yield engine
    close_llm(engine)


@pytest.fixture(scope="module")
def training_file(tmp_path_factory):
    return write_training_file(tmp_path_factory.mktemp("coserve-data") / "train.jsonl")


def engine_job(llm, tmp_path, name: str, training_file, steps: int, publish_every: int, lr: float = 1e-2,
               batch_tokens: int = 40, seed: int = 0, job_dir=None, resume_from: int | None = None) -> str:
    """Submit a job straight through the utility call; returns its id."""
    import dataclasses

    from vllm_slora.finetune.coserve_worker import BATCHES_FILE
    from vllm_slora.finetune.data import load_training_file
    from vllm_slora.finetune.lora_params import LoraParams, LoraSettings
    from vllm_slora.finetune.model_config import DecoderConfig
    from vllm_slora.finetune.packing import pack_examples, save_batches
    from vllm_slora.finetune.trainer import TrainingSettings
    from vllm_slora.step_plan import TrainJobSpec

    model_dir = llm.llm_engine.vllm_config.model_config.model
    job_dir = job_dir or tmp_path / name
    if resume_from is None:
        job_dir.mkdir(parents=True, exist_ok=True)
        examples = load_training_file(training_file, llm.get_tokenizer(), max_length=batch_tokens)
        save_batches(pack_examples(examples, batch_tokens), job_dir / BATCHES_FILE)
        LoraParams.init(DecoderConfig.from_hf(model_dir), LoraSettings(r=8, alpha=16.0), seed=seed).save_peft(
            job_dir / "step-0")
    settings = dataclasses.asdict(TrainingSettings(max_steps=steps, lr=lr))
    job_id = f"{name}-{time.monotonic_ns()}"
    utility(llm, "submit", dataclasses.asdict(TrainJobSpec(
        job_id=job_id, adapter_name=name, job_dir=str(job_dir), init_adapter_dir=str(job_dir / f"step-{resume_from or 0}"),
        settings=settings, total_steps=steps, publish_every=publish_every, seed=seed, base_model=model_dir,
        resume=resume_from is not None,
    )))
    return job_id


def utility(llm, action: str, payload: dict) -> dict:
    return llm.llm_engine.engine_core.call_utility("slora_finetune", action, payload)


def follow(llm, job_id: str, timeout: float = 120.0) -> tuple[str, list[dict]]:
    """Poll until the job ends: (status, every event)."""
    events, after = [], 0
    deadline = time.monotonic() + timeout
    while True:
        reply = utility(llm, "poll", {"job_id": job_id, "after": after})
        events += reply["events"]
        after = reply["next"]
        if reply["status"] not in ("queued", "running"):
            return reply["status"], events
        assert time.monotonic() < deadline, f"job {job_id} did not end: {events[-3:]}"
        time.sleep(0.02)


def step_losses(events) -> list[float]:
    return [e["data"]["loss"] for e in events if e["kind"] == "step"]


def test_engine_job_equals_hf_peft_and_serves_what_it_trained(llm, tiny_model, training_file, tmp_path):
    """20 AdamW steps in the engine (offline API, warmup + clipping): the loss curve equals an
    HF+PEFT loop on the same init and data order; the published adapter loads in PEFT, and the
    engine's greedy tokens with it equal HF+PEFT's."""
    from vllm import SamplingParams

    from tests.hf_reference import hf_greedy
    from vllm_slora.finetune.data import load_training_file
    from vllm_slora.finetune.lora_params import LoraParams, LoraSettings
    from vllm_slora.finetune.model_config import DecoderConfig
    from vllm_slora.finetune.offline import finetune_in_engine
    from vllm_slora.finetune.packing import pack_examples

    seen = []
    result = finetune_in_engine(llm, training_file, "exact", out_dir=tmp_path / "exact", rank=4, alpha=8.0,
                                max_steps=20, lr=1e-2, batch_tokens=40, warmup_steps=3, max_grad_norm=1.0,
                                publish_every=10, progress=False, on_publish=lambda s, p: seen.append(s))
    assert [r.step for r in result.records] == list(range(1, 21)) and seen == [10, 20]
    assert result.adapter_dir.name == "step-20" and result.plot_path.exists()

    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    lora = LoraParams.init(config, LoraSettings(r=4, alpha=8.0), seed=0)
    examples = load_training_file(training_file, llm.get_tokenizer(), max_length=40)
    batches = pack_examples(examples, 40)
    reference = hf_adamw_loss_curve(peft_model_like(hf, lora), lora, examples, batches, 20, lr=1e-2,
                                    warmup_steps=3, max_grad_norm=1.0)
    losses = [r.loss for r in result.records]
    for ours, ref in zip(losses, reference):
        assert abs(ours - ref) <= 1e-4 * abs(ref), (losses, reference)
    assert losses[-1] < 0.8 * losses[0]

    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer(p)["input_ids"] for p in ("the quick brown", "paris is", "many adapters")]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=8, temperature=0.0),
                        lora_request=result.lora_request, use_tqdm=False)
    expected = hf_greedy(tiny_model, prompts, 8, adapter_dir=str(result.adapter_dir))
    assert [list(o.outputs[0].token_ids) for o in outs] == [list(e) for e in expected]


def test_offline_batch_size_steps_accumulate_micro_batches_as_hf_peft_trains_whole_steps(
        llm, tiny_model, training_file, tmp_path):
    """finetune_in_engine(batch_size=3): three examples a step, packed into micro-batches of at most
    batch_tokens whose gradients accumulate in the worker; the loss curve equals an HF + PEFT AdamW
    loop taking each step's examples at once. A batch_size below 1 is refused before any work."""
    from vllm_slora.finetune.coserve_worker import BATCHES_FILE
    from vllm_slora.finetune.data import load_training_file
    from vllm_slora.finetune.lora_params import LoraParams, LoraSettings
    from vllm_slora.finetune.model_config import DecoderConfig
    from vllm_slora.finetune.offline import finetune_in_engine
    from vllm_slora.finetune.packing import load_steps, step_micro_batches, step_totals

    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        finetune_in_engine(llm, training_file, "none", out_dir=tmp_path / "none", batch_size=0, progress=False)
    assert not (tmp_path / "none").exists()
    out = tmp_path / "accumulate"
    result = finetune_in_engine(llm, training_file, "accumulate", out_dir=out, rank=4, alpha=8.0, max_steps=4,
                                lr=1e-2, batch_tokens=16, batch_size=3, truncate=True, progress=False)
    examples = load_training_file(training_file, llm.get_tokenizer(), max_length=16, truncate=True)
    steps = step_micro_batches(examples, 3, 16)
    assert all(len(step) >= 2 for step in steps)  # every step is accumulated over micro-batches
    assert [[b.num_tokens for b in step] for step in load_steps(out / BATCHES_FILE)] == \
        [[b.num_tokens for b in step] for step in steps]
    assert [r.tokens for r in result.records] == [step_totals(steps[i % len(steps)])[0] for i in range(4)]

    hf = load_hf(tiny_model)
    lora = LoraParams.init(DecoderConfig.from_hf(hf.config), LoraSettings(r=4, alpha=8.0), seed=0)
    reference = hf_adamw_loss_curve(peft_model_like(hf, lora), lora, examples, steps, 4, lr=1e-2)
    assert [r.loss for r in result.records] == pytest.approx(reference, rel=1e-4)


def test_inference_tokens_unchanged_while_a_job_trains(llm, tiny_model, training_file, tmp_path):
    """Greedy and seeded-sampling requests, with and without an adapter, give exactly the tokens
    they give with no job, while a job trains in the same steps; cancelling frees the job."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from vllm_slora.adapters.generate import generate_adapters

    (adapter,) = generate_adapters(tiny_model / "config.json", tmp_path / "adapters", 1, ranks=(8,), seed=5,
                                   output_scale=1.0)
    lora = LoRARequest(adapter.name, 77, str(adapter.path))
    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tokenizer(p)["input_ids"]} for p in ("the quick", "a stitch in", "paris", "the")]
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=1.0, seed=11, ignore_eos=True)]

    def run():
        outs = []
        for param in params:
            for lora_request in (None, lora):
                outs += [list(o.outputs[0].token_ids)
                         for o in llm.generate(prompts, param, lora_request=lora_request, use_tqdm=False)]
        return outs

    before = run()
    stats = utility(llm, "stats", {})
    job_id = engine_job(llm, tmp_path, "long", training_file, steps=10**6, publish_every=10**6)
    deadline = time.monotonic() + 60
    while not any(e["kind"] == "step" for e in utility(llm, "poll", {"job_id": job_id})["events"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    during = run()
    middle = utility(llm, "stats", {})
    assert during == before
    # Training ran in steps that also ran these requests (not only in idle steps).
    assert middle["loaded_steps"] > stats["loaded_steps"] and middle["active"] == 1

    utility(llm, "cancel", {"job_id": job_id})
    status, events = follow(llm, job_id)
    assert status == "cancelled" and events[-1]["kind"] == "cancelled" and events[-1]["step"] >= 1
    assert utility(llm, "stats", {})["active"] == 0
    assert run() == before


def test_an_arriving_request_ends_an_idle_training_step(llm, training_file, tmp_path):
    """The multiprocess engine watches its input queue: requests sent while a job trains in idle
    steps end those steps early (counted by the planner) and are answered."""
    from vllm import SamplingParams

    job_id = engine_job(llm, tmp_path, "cut", training_file, steps=10**6, publish_every=10**6)
    deadline = time.monotonic() + 60
    while not any(e["kind"] == "step" for e in utility(llm, "poll", {"job_id": job_id})["events"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    before = utility(llm, "stats", {})
    assert before["arrivals_watched"] is True
    for _ in range(4):
        time.sleep(0.2)  # the engine is back in an idle training step
        (out,) = llm.generate(["the quick"], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 1
    assert utility(llm, "stats", {})["cut_short"] > before["cut_short"]
    utility(llm, "cancel", {"job_id": job_id})
    assert follow(llm, job_id)[0] == "cancelled"


def test_steps_that_compute_prompt_tokens_train_nothing(llm, training_file, tmp_path, trace_file):
    """Requests arrive one by one while others decode and a job trains beside them: a step that
    prefills a new request (its first token leaves with that step's output) gets no training
    budget, while decode-only steps do train. The step trace says which steps scheduled new
    requests (vLLM's scheduled_new_reqs), independently of how the scheduler detects prompt work."""
    from vllm import SamplingParams

    from vllm_slora import trace

    job_id = engine_job(llm, tmp_path, "ttft", training_file, steps=10**6, publish_every=10**6)
    deadline = time.monotonic() + 60
    while not any(e["kind"] == "step" for e in utility(llm, "poll", {"job_id": job_id})["events"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    default_slack = utility(llm, "stats", {})["slack"]
    utility(llm, "configure", {"slack": 0.5})  # a large share: most decode-only steps train
    mark = len(trace.read(str(trace_file)))
    engine = llm.llm_engine
    prompt = llm.get_tokenizer()("the quick brown fox jumps over the lazy dog")["input_ids"]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    try:
        for i in range(8):
            engine.add_request(f"arrival-{i}-{time.monotonic_ns()}", {"prompt_token_ids": prompt}, params)
            for _ in range(5):
                engine.step()
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        utility(llm, "configure", {"slack": default_slack})
        utility(llm, "cancel", {"job_id": job_id})
    assert follow(llm, job_id)[0] == "cancelled"
    steps = [e for e in trace.read(str(trace_file))[mark:] if e["event"] == "step" and "train_budget_s" in e]
    prefills = [e for e in steps if e["new_requests"]]
    decodes = [e for e in steps if not e["new_requests"] and e["scheduled_tokens"]]
    assert len(prefills) >= 4 and len(decodes) >= 40, (len(prefills), len(decodes))
    assert [e["train_budget_s"] for e in prefills] == [0.0] * len(prefills)
    assert sum(e["train_budget_s"] > 0 for e in decodes) >= 3  # training did run beside decodes
    periods = [e["previous_period_s"] for e in steps[1:]]  # each step's record has the one before's length
    assert None not in periods and min(periods) > 0


def _engine_worker_threads(llm, trace_file) -> tuple[int, dict[int, set[int]]]:
    """The worker of `llm`'s engine (a process under its EngineCore that wrote a "worker_init"
    trace line) and its threads pinned to one core each, read from outside it while it is quiet
    (no job, no request)."""
    import os

    import psutil

    from vllm_slora import trace

    (core,) = llm.llm_engine.engine_core.resources.engine_manager.processes
    below = {p.pid for p in psutil.Process(core.pid).children(recursive=True)}
    (pid,) = {e["pid"] for e in trace.read(str(trace_file)) if e["event"] == "worker_init" and e["pid"] in below}
    pinned = {}
    for thread in psutil.Process(pid).threads():
        cores = os.sched_getaffinity(thread.id)
        if len(cores) == 1:
            pinned[thread.id] = cores
    return pid, pinned


def test_idle_steps_train_with_threads_unpinned_and_inference_runs_pinned(llm, training_file, tmp_path,
                                                                          trace_file):
    """vLLM pins the worker's OpenMP threads one per core (threads started later inherit the main
    thread's core): a parallel region then waits for its slowest thread, and a pinned thread
    cannot leave a core another thread or process is using. Idle steps train with those threads
    allowed on all those cores; steps with inference, and the engine once no job trains, keep
    vLLM's pinning. The affinities are read from outside the worker (sched_getaffinity of its
    threads, by thread id), not from its own account."""
    import os

    import psutil
    from vllm import SamplingParams

    pid, pinned = _engine_worker_threads(llm, trace_file)
    cores = set().union(*pinned.values())
    if len(cores) < 2:
        pytest.skip(f"vLLM pinned the worker's threads to {sorted(cores)}: nothing to unpin on this machine")
    job_id = engine_job(llm, tmp_path, "unpin", training_file, steps=10**6, publish_every=10**6)

    def affinities() -> dict[int, set[int]]:
        out = {}
        for tid in pinned:
            try:
                out[tid] = os.sched_getaffinity(tid)
            except OSError:  # a thread that ended meanwhile
                pass
        return out

    engine = llm.llm_engine
    prompt = llm.get_tokenizer()("the quick brown fox jumps over the lazy dog")["input_ids"]
    request_id = f"pinned-{time.monotonic_ns()}"
    generated, during_inference, unpinned_seen = 0, [], False
    try:  # the job is cancelled whatever happens: the module's later tests share the engine
        deadline = time.monotonic() + 60
        while not any(e["kind"] == "step" for e in utility(llm, "poll", {"job_id": job_id})["events"]):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        deadline = time.monotonic() + 30
        while not unpinned_seen and time.monotonic() < deadline:  # idle training: no request anywhere
            now = affinities()
            unpinned_seen = bool(now) and all(a == cores for a in now.values())
            time.sleep(0.005)
        assert unpinned_seen, "the worker's threads stayed pinned while an idle step trained"

        # Far more tokens than sampled, and aborted after: the engine may run ahead of the outputs read here.
        engine.add_request(request_id, {"prompt_token_ids": prompt}, SamplingParams(max_tokens=2000, ignore_eos=True))
        while generated <= 100:
            for output in engine.step():
                generated = len(output.outputs[0].token_ids)
            if generated >= 10:  # mid-decode: every engine step carries inference
                during_inference.append(affinities())
    finally:
        if engine.has_unfinished_requests():
            engine.abort_request([request_id])
            while engine.has_unfinished_requests():
                engine.step()
        utility(llm, "cancel", {"job_id": job_id})
    assert follow(llm, job_id)[0] == "cancelled"
    assert len(during_inference) >= 10
    assert all(sample and all(a == pinned[tid] for tid, a in sample.items()) for sample in during_inference)
    time.sleep(0.5)  # the engine has no job and no request: it stays as vLLM pinned it
    after = affinities()
    assert after and after == {tid: pinned[tid] for tid in after}
    assert pid in {p.pid for p in psutil.Process().children(recursive=True)}  # the same worker throughout


def test_two_jobs_share_the_time_and_both_finish(llm, training_file, tmp_path):
    # Submitted while the engine is paused, so both start in the same step: a step may run
    # a whole small job before the next one's submission is even read.
    core = llm.llm_engine.engine_core
    core.call_utility("pause_scheduler", "keep", False)
    try:
        first = engine_job(llm, tmp_path, "first", training_file, steps=30, publish_every=15)
        second = engine_job(llm, tmp_path, "second", training_file, steps=30, publish_every=15, seed=1)
    finally:
        core.call_utility("resume_scheduler")
    (status_a, events_a), (status_b, events_b) = follow(llm, first), follow(llm, second)
    assert status_a == status_b == "succeeded"
    times_a = [e["time"] for e in events_a if e["kind"] == "step"]
    times_b = [e["time"] for e in events_b if e["kind"] == "step"]
    assert len(times_a) == len(times_b) == 30
    # Interleaved, not one after the other.
    assert times_b[0] < times_a[-1] and times_a[0] < times_b[-1]
    assert [e["step"] for e in events_a if e["kind"] == "published"] == [15, 30]


def test_resumed_job_continues_the_same_loss_curve(llm, training_file, tmp_path):
    """A job stopped after its step-4 checkpoint and resumed from it (optimizer state, schedule,
    dropout stream from trainer_state.pt) gives the uninterrupted job's steps 5..8."""
    whole = engine_job(llm, tmp_path, "whole", training_file, steps=8, publish_every=4)
    _, whole_events = follow(llm, whole)
    part_dir = tmp_path / "part"
    part = engine_job(llm, tmp_path, "part", training_file, steps=4, publish_every=4, job_dir=part_dir)
    _, first_half = follow(llm, part)
    resumed = engine_job(llm, tmp_path, "part", training_file, steps=8, publish_every=4, job_dir=part_dir,
                         resume_from=4)
    status, second_half = follow(llm, resumed)
    assert status == "succeeded"
    assert [e["step"] for e in second_half if e["kind"] == "step"] == [5, 6, 7, 8]
    assert step_losses(first_half) + step_losses(second_half) == pytest.approx(step_losses(whole_events), rel=1e-6)


def test_diverging_job_fails_naming_the_step_and_serving_goes_on(llm, training_file, tmp_path):
    from vllm import SamplingParams

    from vllm_slora.finetune.offline import FinetuneFailed, finetune_in_engine

    with pytest.raises(FinetuneFailed, match=r"failed at step \d+: (training loss is (nan|inf)|the LoRA weights)"):
        finetune_in_engine(llm, training_file, "diverge", out_dir=tmp_path / "diverge", max_steps=50, lr=1e30,
                           batch_tokens=40, publish_every=1, progress=False)
    (out,) = llm.generate(["the quick"], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4
    assert utility(llm, "stats", {})["active"] == 0


def test_waiting_requests_get_the_newest_published_version(llm, tiny_model, training_file, tmp_path):
    """The engine serves a job's newest version from the step that published it: a request that
    names the job's step-0 (what the server had loaded) answers with the step-6 weights, exactly
    like HF+PEFT with that checkpoint; the times from the update to servable and to the first
    request are recorded in that order, and the first request counts as admitted in time (it
    came later than the step right after the update, and was admitted in its own first step)."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from tests.hf_reference import hf_greedy
    from vllm_slora.finetune.lora_params import LoraParams, LoraSettings
    from vllm_slora.finetune.model_config import DecoderConfig

    job_dir = tmp_path / "follow"
    tokenizer = llm.get_tokenizer()
    # Prompts longer than a KV block (128 tokens on CPU), served once with step-0 first: a request
    # that did not get new block hashes with its new version would reuse KV of the old weights.
    prompts = [tokenizer(p * 80)["input_ids"][:160] for p in ("the quick brown ", "paris is ", "many adapters ")]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    stale = LoRARequest("follow", 4100, str(job_dir / "step-0"))

    def generate():
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=stale, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    # engine_job's initial adapter (written again there, the same weights), served before the job.
    LoraParams.init(DecoderConfig.from_hf(tiny_model), LoraSettings(r=8, alpha=16.0), seed=0).save_peft(
        job_dir / "step-0")
    assert generate() == [list(e) for e in hf_greedy(tiny_model, prompts, 8, adapter_dir=str(job_dir / "step-0"))]
    job_id = engine_job(llm, tmp_path, "follow", training_file, steps=6, publish_every=3, lr=2e-2)
    status, events = follow(llm, job_id)
    assert status == "succeeded"
    published = [e for e in events if e["kind"] == "published"]
    assert [e["step"] for e in published] == [3, 6]
    assert all(e["data"]["updated_at"] <= e["data"]["servable_at"] for e in published)

    expected = hf_greedy(tiny_model, prompts, 8, adapter_dir=str(job_dir / "step-6"))
    assert expected != hf_greedy(tiny_model, prompts, 8, adapter_dir=str(job_dir / "step-0"))  # tells them apart
    assert generate() == [list(e) for e in expected]

    (version,) = [v for v in utility(llm, "versions", {})["versions"] if v["name"] == "follow"]
    assert version["step"] == 6 and version["path"] == str(job_dir / "step-6")
    assert version["updated_at"] <= version["servable_at"] <= version["first_request_at"]
    assert version["first_request_step"] > version["updated_step"] >= 0
    # The requests reached the engine after the job had ended (its checkpoint took a step of its
    # own after the publish): more than one step after the update, yet admitted in their first.
    assert version["first_request_step"] - version["updated_step"] >= 2
    assert version["first_request_steps_late"] == 0


def test_training_stops_while_the_engine_is_paused(llm, training_file, tmp_path):
    """pause_scheduler completes with a job running (no work left), no training step runs while
    paused (it would read weights an operator may be replacing), and training resumes after."""
    core = llm.llm_engine.engine_core

    def steps_so_far(job_id):
        return sum(e["kind"] == "step" for e in utility(llm, "poll", {"job_id": job_id})["events"])

    def wait_for_step_after(job_id, count):
        deadline = time.monotonic() + 60
        while steps_so_far(job_id) <= count:
            assert time.monotonic() < deadline, "no training step"
            time.sleep(0.02)

    job_id = engine_job(llm, tmp_path, "paused", training_file, steps=10**6, publish_every=10**6)
    wait_for_step_after(job_id, 0)
    core.call_utility("pause_scheduler", "keep", False)
    try:
        assert core.call_utility("is_scheduler_paused")
        paused_at = steps_so_far(job_id)
        time.sleep(1.0)
        assert steps_so_far(job_id) == paused_at
    finally:
        core.call_utility("resume_scheduler")
    wait_for_step_after(job_id, paused_at)
    utility(llm, "cancel", {"job_id": job_id})
    assert follow(llm, job_id)[0] == "cancelled"
