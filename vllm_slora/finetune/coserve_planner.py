"""Scheduler side of co-served finetuning: the jobs, their events, and each step's budget.

Inference is scheduled exactly as without training; then `order()` decides how many
seconds of training units the workers may add to this step (research/flexllm.md §4.3,
simplified to what a CPU engine can measure):

* at most ``max_jobs`` jobs     -> the memory kept out of the KV cache holds that many
  train at once (admitted)        jobs' state and micro-batches (finetune/memory.py); a
                                  job submitted beyond them waits ("queued", a "waiting"
                                  event) and is admitted, in submission order, when one
                                  ends; a paused job keeps its slot (its state stays);
* paused jobs (`pause`)        -> none of their units; with every job paused the engine
                                  idles as without jobs;
* requests wait for admission -> 0: training never delays a queued request's first token;
* the step computes prompt     -> 0, and the credit does not grow: its requests' first
  tokens (a prefill chunk)        tokens leave with this step's output, so training there
                                  would add to their TTFT (research/flexllm.md §4.3,
                                  "protecting TTFT"). The share is of the decode-only steps,
                                  the ones a running request's TPOT is made of: were it of
                                  every step and spent on decode-only ones, those would grow
                                  by slack x (all steps / decode-only steps), measured 4.8-
                                  7.5 % for a 5 % share at the bench's loads;
* no inference at all          -> full speed (at least one unit): where the EngineCore's
                                  input queue is watched (finetune/arrivals.py; every
                                  multiprocess engine), steps of ``WATCHED_IDLE_STEP_S`` that
                                  end before the next unit once a request arrives; otherwise
                                  ``idle_step_s``, and only ``idle_step_s / IDLE_SHORTEN``
                                  within ``RECENT_LOAD_S`` of the last inference (an arrival
                                  waits about one such step). Within ``RECENT_LOAD_S`` units
                                  are kept short too (no whole-loss unit: an arrival waits
                                  for the unit in progress);
* otherwise (decode-only)       -> a credit that grows by ``slack`` x the step period
                                  without training (EWMA of the wall time between two
                                  schedule() calls of decode-only steps, i.e. what a running
                                  request waits per token) every such step, and shrinks by
                                  what a step with training really cost: its period minus
                                  that baseline (at least its training time), and the next
                                  step's period minus that baseline where it is decode-only
                                  (training's spill: a step right after a burst ran 4 %
                                  slower than a clean one, the two after it did not;
                                  signed, so noise averages out). A step trains
                                  only once the credit holds a burst (``BURST_STEPS``
                                  steps' share, at most ``MIN_BURST_S``, or the next unit
                                  if longer), then spends it on as many units as fit: on
                                  average training adds ``slack`` of the step time (TPOT,
                                  a per-request mean, grows by about that share).

Charging the measured period, not the units' own time, matters on a CPU: training slows
what runs around it (allocator, caches, the other processes' share of the cores), which
the units' timers do not see. Part of that slowdown may fall on the steps after the one
that trained, which count as steps without training (the baseline): with units of a few
ms (layer_units.py), a few ms of training in most steps would leave almost no clean
step to measure the baseline on, so training comes in bursts, at about the cadence the
earlier whole-layer units had (one 15-30 ms unit every so many steps). Not isolated by
measurement: an A/B of the two unit sizes at share 0.05, both in bursts, gave the same
TPOT p50 growth (benchmarks/results/coserve-20261201-cpu-2c-ab-*.json). Figures come from the workers' reports (training seconds,
expected unit times) and the scheduler's clock, so the policy adapts to the machine and
the load. Jobs are driven through `handle()` (EngineCore utility calls,
patches/patch_engine_core.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vllm_slora import trace
from vllm_slora.config import coserve_settings_problem
from vllm_slora.step_plan import SLoRAWorkerReport, TrainEvent, TrainJobSpec, TrainOrder

EWMA_WEIGHT = 0.2
RECENT_LOAD_S = 2.0  # inference this recent: requests are likely to arrive soon
IDLE_SHORTEN = 5  # idle steps are this much shorter then
# Idle steps when arrivals are watched: a request arriving meanwhile waits for one unit only,
# so long steps cost no latency and save step boundaries (engine calls and utility replies,
# e.g. a job's events, wait for the step's end though).
WATCHED_IDLE_STEP_S = 0.5
# A loaded step trains only once the credit holds a burst: the next unit, or else
# BURST_STEPS steps' share (training about once in that many steps), at most MIN_BURST_S.
BURST_STEPS = 10
MIN_BURST_S = 0.02
ACTIVE = ("queued", "running")  # not ended (a paused job is one of these, with `paused` set)
TERMINAL_KIND = {"finished": "succeeded", "failed": "failed", "cancelled": "cancelled"}


class TrainingRefused(ValueError):
    pass


@dataclass
class _Planned:
    spec: TrainJobSpec
    status: str = "queued"
    events: list[dict] = field(default_factory=list)
    paused: bool = False
    admitted: bool = False  # handed to the workers (holds a training slot until it ends)

    @property
    def runnable(self) -> bool:
        return self.admitted and self.status in ACTIVE and not self.paused


@dataclass
class TrainingStats:
    steps: int = 0  # engine steps that ran training units
    loaded_steps: int = 0  # ... of them, steps that also ran inference
    units: int = 0
    seconds: float = 0.0
    loaded_seconds: float = 0.0  # training seconds added to steps with inference
    inference_seconds: float = 0.0  # inference seconds of those same steps
    loaded_cost_seconds: float = 0.0  # what those steps cost beyond the period without training (spill included)
    spill_seconds: float = 0.0  # ... of it, what the decode-only steps right after them lost (signed)
    cut_short: int = 0  # steps whose training stopped early for an arriving request


class TrainingPlanner:
    def __init__(self, slack: float, idle_step_s: float, tp_size: int = 1, pp_size: int = 1,
                 clock=time.monotonic, max_jobs: int = 2) -> None:
        self.clock = clock
        self._last_loaded = float("-inf")  # clock() of the last step with inference
        self.slack = slack
        self.idle_step_s = idle_step_s
        self.tp_size, self.pp_size = tp_size, pp_size
        self.jobs: dict[str, _Planned] = {}
        self.max_jobs = max_jobs
        self._waiting: list[str] = []  # submitted beyond max_jobs, in submission order
        self._start: list[TrainJobSpec] = []
        self._cancel: list[str] = []
        self._pause: list[str] = []
        self._resume: list[str] = []
        self.credit = 0.0
        self.inference_s: float | None = None  # EWMA of a step's inference seconds (worker)
        self.period_s: float | None = None  # EWMA of a decode-only step's period without training
        self._previous: tuple[str, float] | None = None  # (kind, training seconds) of the last step
        self.next_unit_s = 0.0
        self.stats = TrainingStats()
        self._last_idle = False
        self._last_prefill = False  # the last ordered step computed prompt tokens
        self._trained_last = False  # the last reported step ran training units (not an idle step)
        # Shared counter of requests waiting in the EngineCore's input queue (finetune/arrivals.py),
        # set by the scheduler once it watches that queue; None for in-process engines.
        self.arrivals: str | None = None
        self.loan = None  # pool/training_loan.py TrainingLoan, set by the scheduler of CPU engines
        self.graph_bytes_wanted = 0  # what the jobs' next micro-batches would keep as graphs (workers)
        self.graph_layer_bytes = 0  # ... one layer's graph of the largest of them

    # -- control (EngineCore utility calls) ------------------------------------------------
    def handle(self, action: str, payload: dict) -> dict:
        if action == "submit":
            return self.submit(TrainJobSpec(**payload))
        if action == "cancel":
            return self.cancel(payload["job_id"])
        if action == "pause":
            return self.pause(payload["job_id"], True)
        if action == "resume":
            return self.pause(payload["job_id"], False)
        if action == "poll":
            return self.poll(payload["job_id"], int(payload.get("after", 0)))
        if action == "configure":
            return self.configure(payload)
        if action == "stats":
            return dict(vars(self.stats), slack=self.slack, credit=self.credit, inference_s=self.inference_s, period_s=self.period_s,
                        unit_s=self.next_unit_s, active=sum(j.status in ACTIVE for j in self.jobs.values()),
                        waiting=len(self._waiting), max_jobs=self.max_jobs,
                        paused=sum(j.paused and j.status in ACTIVE for j in self.jobs.values()),
                        arrivals_watched=self.arrivals is not None, **self._loan_stats())
        raise TrainingRefused(f"unknown finetune action {action!r}")

    def _loan_stats(self) -> dict:
        loan = self.loan
        if loan is None:
            return {"loan_blocks": 0, "loan_bytes": 0, "loans": 0, "loan_recalls": 0}
        return {"loan_blocks": loan.num_blocks, "loan_bytes": loan.nbytes, "loans": loan.lends,
                "loan_recalls": loan.recalls}

    def configure(self, settings: dict) -> dict:
        """Change the co-serving settings while serving (an operator's `POST /v1/fine_tuning/coserve`)."""
        if problem := coserve_settings_problem(settings):
            raise TrainingRefused(problem[1])
        if "slack" in settings:
            self.slack = float(settings["slack"])
            self.credit = min(self.credit, 0.0)  # what the old share saved up is not spent at the new one
        return {"slack": self.slack}

    def submit(self, spec: TrainJobSpec) -> dict:
        if self.tp_size > 1 or self.pp_size > 1:
            raise TrainingRefused(f"co-served finetuning runs on tensor/pipeline parallel size 1 only "
                                  f"(this engine: TP {self.tp_size}, PP {self.pp_size})")
        if spec.job_id in self.jobs:
            raise TrainingRefused(f"job {spec.job_id} was already submitted")
        job = self.jobs[spec.job_id] = _Planned(spec, paused=spec.paused)
        self._waiting.append(spec.job_id)
        self._admit()
        if not job.admitted:
            job.events.append({"kind": "waiting", "step": 0, "time": time.time(), "data": {
                "ahead": len(self._waiting) - 1, "max_jobs": self.max_jobs}})
        return {"job_id": spec.job_id, "status": self._status(job)}

    def _admit(self) -> None:
        """Hand waiting jobs to the workers while fewer than max_jobs hold a slot."""
        while self._waiting and sum(j.admitted and j.status in ACTIVE for j in self.jobs.values()) < self.max_jobs:
            job = self.jobs[self._waiting.pop(0)]
            job.admitted = True
            self._start.append(job.spec)
            if job.paused:  # the workers start it and pause it in the same step
                self._pause.append(job.spec.job_id)

    def cancel(self, job_id: str) -> dict:
        job = self.jobs.get(job_id)
        if job is None:
            raise TrainingRefused(f"no finetuning job {job_id} in this engine")
        if job.status in ACTIVE:
            if job_id in self._waiting:
                self._waiting.remove(job_id)
                self.record(TrainEvent(job_id, "cancelled", 0))
            elif any(s.job_id == job_id for s in self._start):
                self._start = [s for s in self._start if s.job_id != job_id]
                self._pause = [j for j in self._pause if j != job_id]
                self.record(TrainEvent(job_id, "cancelled", 0))
            else:
                self._cancel.append(job_id)
        return {"job_id": job_id, "status": job.status}

    def pause(self, job_id: str, paused: bool) -> dict:
        """Pause a job (it keeps its state and runs no units from the next step on) or resume it."""
        job = self.jobs.get(job_id)
        if job is None:
            raise TrainingRefused(f"no finetuning job {job_id} in this engine")
        if job.status not in ACTIVE:
            raise TrainingRefused(f"job {job_id} has {job.status}; it can no longer be "
                                  f"{'paused' if paused else 'resumed'}")
        if job.paused != paused and not job.admitted:
            job.paused = paused  # told to the workers with its start
        elif job.paused != paused:
            job.paused = paused
            ours, other = (self._pause, self._resume) if paused else (self._resume, self._pause)
            if job_id in other:
                other.remove(job_id)  # not yet told to the workers: the two cancel out
            else:
                ours.append(job_id)
        return {"job_id": job_id, "status": self._status(job)}

    @staticmethod
    def _status(job: _Planned) -> str:
        return "paused" if job.paused and job.status in ACTIVE else job.status

    def poll(self, job_id: str, after: int = 0) -> dict:
        job = self.jobs.get(job_id)
        if job is None:
            raise TrainingRefused(f"no finetuning job {job_id} in this engine")
        events = job.events[after:]
        if job.status not in ACTIVE and after + len(events) >= len(job.events):
            del self.jobs[job_id]  # the client has seen the end: forget the job
        return {"status": self._status(job), "events": events, "next": after + len(events)}

    def busy(self) -> bool:
        """Training has work: the engine must keep stepping even with no request."""
        return bool(self._start or self._cancel or self._pause or self._resume) or any(
            j.runnable for j in self.jobs.values())

    # -- per step ----------------------------------------------------------------------------
    def order(self, running: int, waiting: int, scheduled_tokens: int, prefill: bool = False) -> TrainOrder | None:
        """This step's training. `prefill`: the step computes prompt tokens of some request."""
        if not self.busy():
            return None
        order = TrainOrder(start=self._start, cancel=self._cancel, pause=self._pause, resume=self._resume,
                           arrivals=self.arrivals)
        self._start, self._cancel, self._pause, self._resume = [], [], [], []
        self._last_idle = False
        self._last_prefill = prefill
        if waiting:
            order.budget_s = 0.0  # admission first
            self._last_loaded = self.clock()
        elif not scheduled_tokens and not running:
            recent = self.clock() - self._last_loaded < RECENT_LOAD_S
            order.short_units = recent
            if self.arrivals is not None:  # an arrival ends the step after the unit it waits for
                order.budget_s = max(self.idle_step_s, WATCHED_IDLE_STEP_S)
            else:
                order.budget_s = self.idle_step_s / IDLE_SHORTEN if recent else self.idle_step_s
            order.idle = True
            self._last_idle = True
            self.credit = 0.0
        else:
            self._last_loaded = self.clock()
            per_step = self.slack * (self.period_s or self.inference_s or 0.0)
            burst = max(self.next_unit_s, min(MIN_BURST_S, BURST_STEPS * per_step)) if per_step > 0 else 0.0
            if not prefill:  # the share is of decode-only steps (see the module's docstring)
                self.credit = min(self.credit + per_step, max(burst, per_step))
            spend = self.credit >= burst and self.credit > 0 and not prefill
            order.budget_s = self.credit if spend else 0.0
        return order

    def observe_period(self, seconds: float) -> None:
        """Wall time of the step that just ended (from its schedule() to the next one's)."""
        previous, self._previous = self._previous, None
        if previous is None:
            return
        kind, trained = previous
        if kind == "loaded":
            self.period_s = seconds if self.period_s is None else (
                EWMA_WEIGHT * seconds + (1 - EWMA_WEIGHT) * self.period_s)
        elif kind == "trained":
            cost = trained if self.period_s is None else max(seconds - self.period_s, trained)
            self.stats.loaded_cost_seconds += cost
            # Overspending (an indivisible unit, the slowdown around it) is paid back later.
            self.credit -= cost
        elif kind == "after" and self.period_s is not None:
            spill = seconds - self.period_s  # signed: a faster step gives the credit back
            self.stats.spill_seconds += spill
            self.stats.loaded_cost_seconds += spill
            self.credit -= spill

    def take(self, report: SLoRAWorkerReport) -> None:
        if report.inference_seconds > 0 and not self._last_idle:
            previous = self.inference_s
            self.inference_s = report.inference_seconds if previous is None else (
                EWMA_WEIGHT * report.inference_seconds + (1 - EWMA_WEIGHT) * previous)
        self.stats.cut_short += report.train_cut_short
        if report.train_units:
            self.stats.steps += 1
            self.stats.units += report.train_units
            self.stats.seconds += report.train_seconds
            if not self._last_idle:
                self.stats.loaded_steps += 1
                self.stats.loaded_seconds += report.train_seconds
                self.stats.inference_seconds += report.inference_seconds
        trained_before, self._trained_last = self._trained_last, bool(report.train_units) and not self._last_idle
        if self._last_idle:
            self._previous = None
        elif report.train_units:
            self._previous = ("trained", report.train_seconds)
        elif report.inference_seconds > 0 and not self._last_prefill:
            # The baseline is a decode-only step: what the steps that train (decode-only, see
            # order()) would have taken without training; prefill steps are longer. The one
            # right after a step that trained is not a sample of it but training's spill.
            self._previous = ("after", 0.0) if trained_before else ("loaded", 0.0)
        else:
            self._previous = None
        if report.training is not None:
            self.next_unit_s = report.next_unit_seconds
            self.graph_bytes_wanted = report.train_graph_bytes_wanted
            self.graph_layer_bytes = report.train_graph_layer_bytes
            for event in report.training:
                self.record(event)

    def record(self, event: TrainEvent) -> None:
        job = self.jobs.get(event.job_id)
        if job is None:
            return
        job.events.append({"kind": event.kind, "step": event.step, "data": event.data, "time": time.time()})
        trace.record("train_event", job=event.job_id, kind=event.kind, train_step=event.step)
        if event.kind == "started" and job.status == "queued":
            job.status = "running"
        elif event.kind in TERMINAL_KIND and job.status in ACTIVE:
            job.status = TERMINAL_KIND[event.kind]
            self._admit()  # its slot is free
