"""Co-served finetuning jobs inside the engine's worker, run in the time the scheduler grants.

The model runner calls `WorkerTraining.step(order)` after each step's inference (same
thread, same weights): it starts / drops jobs as the `TrainOrder` says, then runs work
units while their expected time fits in ``order.budget_s`` (at least one when the engine
has no inference). Jobs share the budget fairly: the next unit always goes to the job that
has spent the least time so far.

A job's life, unit by unit (every unit is a preemption point):

    fwd, loss, bwd              one packed micro-batch (layer_units.LayerSlicedPass: each
                                layer's attention block, then its MLP block in as many rows
                                as the step's time allows, down and back up; as many of
                                its layers keep their graphs as fit what is left of the
                                graph budget beside the other jobs' micro-batches, the
                                others are recomputed in backward; finetune/memory.py)
                                (an optimizer step of several micro-batches runs one pass
                                each, their gradients accumulated, each loss divided by the
                                step's loss tokens)
    update                      clip + AdamW + schedule (LoraTrainer.update), a "step" event
    publish (every N steps)     PEFT files to <job dir>/step-N (durable; what the server
                                registers) + the packed weights into this worker's host
                                cache from memory, so serving that version reads no disk;
                                "published"
    checkpoint                  optimizer state to trainer_state.pt (resume): after a publish
                                at most every CHECKPOINT_EVERY_S, and after the last step
    validation (jobs with a     after each publish: a forward-only pass (LayerSlicedPass with
    validation file)            evaluate=True, the same unit kinds without backward) over
                                every validation micro-batch, with the published weights;
                                "validated" (token-mean loss over the whole set). The next
                                training pass starts after it; it is not saved in checkpoints:
                                a job resumed from a version the server has no validation
                                loss for (TrainJobSpec.validated_steps) validates it first

A paused job (TrainOrder.pause) keeps its LoRA weights, optimizer state and place in its
pass, runs no units and drops its layer graphs (its backward recomputes them) until
resumed.

Training reads the base weights as views of the engine's own parameters (never copied:
checked by data_ptr) and gives autograd only to the job's LoRA A/B. A unit that raises, a
non-finite loss or non-finite weights fail that job alone, naming the step; inference and
other jobs go on.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from vllm_slora.libc import libc
from vllm_slora.step_plan import TrainEvent, TrainJobSpec, TrainOrder

from .arrivals import ArrivalCounter
from .base_weights import BaseWeights, base_weights_from_vllm
from .layer_units import (
    FWD_ATTN,
    FWD_MLP,
    LOSS,
    LOSS_CHUNK,
    LOSS_SLICE,
    MLP_CHUNK,
    ROW_KINDS,
    VOCAB_CHUNK,
    LayerSlicedPass,
    activation_bytes,
    graph_layers_within,
    layer_graph_bytes,
    pass_bytes,
)
from .lora_params import LoraParams
from .memory import max_loss_rows
from .packing import PackedBatch, load_batches, load_steps, step_totals
from .trainer import LoraTrainer, TrainingSettings

UPDATE, PUBLISH, CHECKPOINT = "update", "publish", "checkpoint"
TRAINER_STATE = "trainer_state.pt"
BATCHES_FILE = "batches.pt"
VALIDATION_BATCHES_FILE = "validation_batches.pt"  # present for jobs with a validation file
EWMA_WEIGHT = 0.3  # weight of the newest observation in a unit kind's expected time
SLICE_CELLS = 256 * VOCAB_CHUNK  # LOSS_SLICE times are kept per this many (row, LM head column) cells
# The optimizer state (2x the adapter) takes as long to write as the version itself (~65 ms
# each for rank 16 on all 7 projections of the default model): at every 5-step publish that
# was 3 % of an idle job's time. A resume replays at most this much training (the same
# data, seed and order give the same weights again).
CHECKPOINT_EVERY_S = 30.0


def engine_base_weights(model) -> BaseWeights:
    """The training forward's base weights: views of `model`'s own parameters, checked."""
    base = base_weights_from_vllm(model)
    storage = {p.data_ptr() for p in model.parameters()}
    copied = [name for name, t in base.named_tensors() if t.data_ptr() not in storage]
    if copied:
        raise AssertionError(f"base weights {copied} are not views of the engine's parameters")
    return base


@dataclass
class _Job:
    spec: TrainJobSpec
    lora: LoraParams
    trainer: LoraTrainer
    steps: list[list[PackedBatch]]  # an epoch's optimizer steps, each its micro-batches
    rng: torch.Tensor  # LoRA dropout stream, carried from pass to pass
    unit_pass: LayerSlicedPass | None = None
    micro: int = 0  # the micro-batch of the step in progress that the next pass trains on
    step_loss: float = 0.0  # the step's loss so far (its micro-batches' passes done)
    pass_lr: float = 0.0
    pass_seconds: float = 0.0  # unit time of the step in progress (all its micro-batches)
    publish_due: bool = False
    checkpoint_due: bool = False  # trainer_state.pt of the last published step not written yet
    checkpointed_at: float = field(default_factory=time.monotonic)  # the last trainer_state.pt (or the start)
    spent_s: float = 0.0  # all unit time so far: the fairness key
    last_loss: float = float("nan")
    updated_at: float | None = None  # wall time the last optimizer update ended
    updated_step: int | None = None  # ... and the engine step it ended in
    published: list[int] = field(default_factory=list)
    validation_batches: list[PackedBatch] = field(default_factory=list)
    validation: _Validation | None = None  # in progress after a publish

    @cached_property
    def graph_kind(self) -> dict:
        """What sizes this job's layer graphs beside the micro-batch (layer_units.layer_graph_bytes);
        fixed for the job, and read on every step's report."""
        return {"lora_rank": max(m.rank for m in self.lora.modules.values()), "dropout": self.lora.settings.dropout > 0}

    def next_step(self) -> list[PackedBatch]:
        """The micro-batches of the job's next (or current) optimizer step (the steps cycle)."""
        return self.steps[self.trainer.steps_done % len(self.steps)]

    def next_batch(self) -> PackedBatch:
        """The micro-batch of the job's next pass."""
        return self.next_step()[self.micro]

    def next_kind(self) -> str:
        if self.publish_due:
            return PUBLISH
        if self.checkpoint_due:
            return CHECKPOINT
        if self.validation is not None:
            return self.validation.unit_pass.next_kind
        if self.unit_pass is None:
            return FWD_ATTN
        return self.unit_pass.next_kind or UPDATE

    @property
    def current_pass(self) -> LayerSlicedPass | None:
        """The pass the next pass unit belongs to: the validation in progress, or the training pass."""
        return self.validation.unit_pass if self.validation is not None else self.unit_pass


@dataclass
class _Validation:
    """A validation of one published step: one evaluation pass per validation micro-batch in turn."""

    step: int
    unit_pass: LayerSlicedPass
    index: int = 0  # of the job's validation micro-batch `unit_pass` evaluates
    loss_sum: float = 0.0  # sum over the micro-batches done of their loss x loss tokens
    loss_tokens: int = 0
    seconds: float = 0.0


class JobFailed(RuntimeError):
    pass


class WorkerTraining:
    """The jobs of one worker. `model`: the engine's vLLM model (its parameters are the base
    weights); or give `base` directly (tests and in-process drivers without vLLM)."""

    def __init__(self, model, base_model: str = "", base: BaseWeights | None = None,
                 activation_budget_bytes: int = 1 << 30) -> None:
        self.model = model
        self.base_model = base_model
        # A pass keeps every layer's graph (no recompute) when its activations fit in this,
        # beside the other jobs' passes in flight. Where the scheduler lends pool blocks
        # (pool/training_loan.py), the lent bytes replace it (set_graph_budget).
        self.activation_budget_bytes = activation_budget_bytes
        self.graph_budget_bytes = activation_budget_bytes
        self.graphs_on_loan = False  # the budget is what the scheduler lends (set_graph_budget)
        self._base: BaseWeights | None = base
        self.jobs: dict[str, _Job] = {}
        # Paused jobs (TrainOrder.pause): they keep their weights, optimizer state and place
        # in the pass, run no units and hold no layer graphs until resumed.
        self.paused: set[str] = set()
        self.unit_seconds: dict[str, float] = {}  # expected seconds per unit kind (EWMA)
        self.events: list[TrainEvent] = []
        self.host_cache = None  # set by the runner: published versions go in from memory
        self._arrival_counter: ArrivalCounter | None = None
        self.cut_short = False  # the last step stopped early for an arriving request
        self._engine_step = 0  # the step the units now running belong to (TrainOrder.engine_step)
        keep_freed_memory()

    @property
    def base(self) -> BaseWeights:
        if self._base is None:
            base = engine_base_weights(self.model)
            base.check_usable_for_training()
            self._base = base
        return self._base

    # -- orders ----------------------------------------------------------------------------
    def step(self, order: TrainOrder) -> tuple[float, int]:
        """Apply `order` and run units within its budget; returns (seconds spent, units run)."""
        # Workers call this inside vLLM's inference mode; tensors made under it (LoRA
        # parameters, optimizer state, batches) could not take part in autograd.
        with torch.inference_mode(False):
            return self._step(order)

    def _step(self, order: TrainOrder) -> tuple[float, int]:
        for job_id in order.cancel:
            job = self.jobs.pop(job_id, None)
            self.paused.discard(job_id)
            if job is not None:
                self._event(job, "cancelled", step=job.trainer.steps_done)
        for spec in order.start:
            self._start(spec)
        self._pause_resume(order.pause, order.resume)
        if order.start and self.graphs_on_loan and self.graph_budget_bytes < self.graph_bytes_wanted():
            # The scheduler lends blocks for graphs from what this step reports; a job
            # starting now has reported nothing yet. One step's wait gets its first pass
            # the loan rather than a whole pass of recomputed layers (~1.4x its time).
            return 0.0, 0
        spent, units = 0.0, 0
        arrivals = self._arrivals(order.arrivals)
        self._engine_step = order.engine_step
        self.cut_short = False
        while runnable := self._runnable():
            if arrivals is not None and arrivals.waiting() > 0:
                self.cut_short = True  # a request waits for this step to end: let it in
                break
            job = min(runnable, key=lambda j: j.spent_s)
            kind = job.next_kind()
            # Steps with inference, or right after it, run the loss in vocabulary slices (short units).
            sliced = kind == LOSS_SLICE or (kind == LOSS and not (order.idle and not order.short_units))
            expected = self._expected_seconds(job, kind, sliced)
            if spent + expected > order.budget_s and not (order.idle and units == 0):
                break
            budget_left = 0.0 if order.short_units else order.budget_s - spent
            rows = vocab = None
            if sliced:
                rows = self._loss_group_rows(job)
                vocab = self._slice_columns(rows, budget_left)
            elif kind in ROW_KINDS:
                rows = self._unit_rows(kind, budget_left)
                if kind == FWD_MLP and not self._may_chunk_kept_mlp(job, rows):
                    rows = None  # the rest of the block in one unit
            spent += self._timed_unit(job, kind, rows, vocab)
            units += 1
            if kind == PUBLISH:
                break  # its report makes the version servable at once
            if job.publish_due and job.spec.job_id in self.jobs:
                # The update just made a version to publish: publish it in this same step,
                # whatever the budget, and end the step, so that its report makes the version
                # servable to the requests of the very next step.
                spent += self._timed_unit(job, PUBLISH)
                units += 1
                break
        return spent, units

    def _runnable(self) -> list[_Job]:
        return [job for job_id, job in self.jobs.items() if job_id not in self.paused]

    def _pause_resume(self, pause: list[str], resume: list[str]) -> None:
        freed = False
        for job_id in pause:
            job = self.jobs.get(job_id)
            if job is None or job_id in self.paused:
                continue
            self.paused.add(job_id)
            if job.checkpoint_due:  # a restart while paused resumes from its last published step
                self._timed_unit(job, CHECKPOINT)
            if job.unit_pass is not None and job.unit_pass.graph_layers:
                job.unit_pass.drop_graphs(keep_layers=0)  # the rest of its pass recomputes them
                freed = True
            self._event(job, "paused", step=job.trainer.steps_done)
        for job_id in resume:
            job = self.jobs.get(job_id)
            if job is None or job_id not in self.paused:
                continue
            self.paused.discard(job_id)
            # The fairness key: a job back from a pause gets its share from now on, not the
            # time it missed (which would starve the others until it caught up).
            others = [j.spent_s for j in self._runnable() if j is not job]
            if others:
                job.spent_s = max(job.spent_s, min(others))
            self._event(job, "resumed", step=job.trainer.steps_done)
        if freed:
            return_freed_memory()

    def set_graph_budget(self, graph_bytes: int | None) -> None:
        """Apply the order's graph budget (None: loans are not used, keep our own). A smaller
        one than the passes in flight keep drops as many of their layer graphs as it takes,
        now, before the step's forward may write the recalled pages, and returns the freed
        heap to the OS."""
        budget = self.activation_budget_bytes if graph_bytes is None else graph_bytes
        self.graphs_on_loan = graph_bytes is not None
        shrinking = budget < self.graph_budget_bytes
        self.graph_budget_bytes = budget
        if not shrinking:
            return
        dropped = False
        for job in self.jobs.values():
            excess = self._held_bytes() - budget
            if excess <= 0:
                break
            unit_pass = job.unit_pass
            if unit_pass is not None and unit_pass.keep_graph:
                layer = layer_graph_bytes(unit_pass.batch.seq_lens, self.base.config, **job.graph_kind)
                unit_pass.drop_graphs(keep_layers=unit_pass.graph_layers - -(-excess // layer))
                dropped = True
        if dropped or graph_bytes == 0:
            return_freed_memory()

    def graph_bytes_wanted(self) -> int:
        """Activation bytes the jobs' micro-batches would keep with every layer's graph: the
        pass in flight's, or the next batch's (what a loan of pool blocks should cover)."""
        return sum(activation_bytes(self._pass_batch(job).seq_lens, self.base.config, True, **job.graph_kind)
                   for job in self._runnable())

    def graph_layer_bytes(self) -> int:
        """One layer's graph of the largest of those micro-batches: a loan smaller than this
        buys no layer its graph."""
        return max((layer_graph_bytes(self._pass_batch(job).seq_lens, self.base.config, **job.graph_kind)
                    for job in self._runnable()), default=0)

    @staticmethod
    def _pass_batch(job: _Job) -> PackedBatch:
        return job.unit_pass.batch if job.unit_pass is not None else job.next_batch()

    def _held_bytes(self, but: _Job | None = None) -> int:
        """Activation bytes the passes in flight keep (all jobs', or all but `but`'s)."""
        return sum(pass_bytes(j.unit_pass.batch.seq_lens, self.base.config, j.unit_pass.graph_layers, **j.graph_kind)
                   + j.unit_pass.chunk_output_bytes()
                   for j in self.jobs.values() if j is not but and j.unit_pass is not None)

    def _unit_rows(self, kind: str, budget_left_s: float) -> int:
        """Rows for the next row-wise unit (LOSS, or an MLP block's): as many whole chunks as
        the rest of the step's budget is expected to take, at least one. GEMMs are faster per
        row with more rows, so an idle step runs a whole block at once and a loaded one short
        units. Whole chunks: the GEMM shapes repeat, and oneDNN (frozen_linear.py) makes a
        primitive per new shape (~0.7 ms on 2 cores, a unit's worth) and caches it."""
        chunk = _chunk_rows(kind)
        per_chunk = self.unit_seconds.get(kind)
        rows = chunk if not per_chunk else max(1, int(budget_left_s / per_chunk)) * chunk
        if kind == LOSS:  # its logits stay within finetune/memory.py's share
            rows = min(rows, max_loss_rows(self.base.config))
        return rows

    def _may_chunk_kept_mlp(self, job: _Job, rows: int) -> bool:
        """Whether `job`'s next forward MLP unit may take only `rows` rows: always, unless its
        layer keeps its graph and the chunks' outputs it would then hold (LayerSlicedPass.
        chunk_output_bytes) do not fit the graph budget beside what the passes hold."""
        unit_pass = job.current_pass
        if unit_pass is None or not unit_pass.next_mlp_keeps_graph or rows >= unit_pass.num_tokens:
            return True
        return self._held_bytes() + unit_pass.chunking_bytes(rows) <= self.graph_budget_bytes

    def _loss_group_rows(self, job: _Job) -> int:
        """Rows of the LOSS_SLICE group in progress or the next one (its logits stay within
        finetune/memory.py's share)."""
        unit_pass = job.current_pass
        group = unit_pass.loss_slice_rows if unit_pass is not None else 0
        if group:
            return group
        left = unit_pass.loss_rows_left if unit_pass is not None else max_loss_rows(self.base.config)
        return max(1, min(left, max_loss_rows(self.base.config)))

    def _slice_columns(self, group_rows: int, budget_left_s: float) -> int:
        """LM head columns for the next LOSS_SLICE unit: as many whole VOCAB_CHUNKs as the rest
        of the step's budget is expected to take, at least one (whole chunks: see _unit_rows)."""
        per_cells = self.unit_seconds.get(LOSS_SLICE)
        if not per_cells:
            return VOCAB_CHUNK
        return max(1, int(budget_left_s / per_cells * SLICE_CELLS / group_rows / VOCAB_CHUNK)) * VOCAB_CHUNK

    def _expected_seconds(self, job: _Job, kind: str, sliced: bool) -> float:
        """Expected time of `job`'s shortest next unit of `kind` (a LOSS one in slices if `sliced`)."""
        if sliced:
            per_cells = self.unit_seconds.get(LOSS_SLICE, 0.0)
            return per_cells * self._loss_group_rows(job) * VOCAB_CHUNK / SLICE_CELLS
        return self.unit_seconds.get(kind, 0.0)

    def _timed_unit(self, job: _Job, kind: str, rows: int | None = None, vocab: int | None = None) -> float:
        """Run one unit of `job` (a failure fails the job only); returns its seconds."""
        validation = job.validation if kind not in (PUBLISH, CHECKPOINT) else None
        ran_pass = validation.unit_pass if validation is not None else None
        started = time.perf_counter()
        try:
            kind = self._run_unit(job, kind, rows, vocab) or kind
        except Exception as exc:  # the job fails, the engine serves on
            self.jobs.pop(job.spec.job_id, None)
            message = str(exc) if isinstance(exc, JobFailed) else f"{type(exc).__name__}: {exc}"
            self._event(job, "failed", step=job.trainer.steps_done + 1, message=message)
        seconds = time.perf_counter() - started
        job.spent_s += seconds
        if validation is not None:
            if kind in self.unit_seconds:  # a forward-only unit: training's estimates stay (an upper bound)
                return seconds
        elif kind not in (PUBLISH, CHECKPOINT):
            job.pass_seconds += seconds
        ran_pass = ran_pass or job.unit_pass
        observed = seconds
        if kind == LOSS_SLICE and ran_pass is not None:  # per SLICE_CELLS, whatever the slice's size
            observed = seconds * SLICE_CELLS / max(1, ran_pass.last_unit_cells)
        elif kind in ROW_KINDS and ran_pass is not None:  # per chunk of rows, whatever the unit's size
            observed = seconds * _chunk_rows(kind) / max(1, ran_pass.last_unit_rows)
        previous = self.unit_seconds.get(kind)
        self.unit_seconds[kind] = observed if previous is None else (
            EWMA_WEIGHT * observed + (1 - EWMA_WEIGHT) * previous)
        return seconds

    def _arrivals(self, path: str | None) -> ArrivalCounter | None:
        if path is None:
            return None
        if self._arrival_counter is None or self._arrival_counter.path != path:
            try:
                self._arrival_counter = ArrivalCounter.attach(path)
            except OSError:  # another machine / no shared file: steps just are not cut short
                return None
        return self._arrival_counter

    def next_unit_seconds(self) -> float:
        """Expected time of the longest next unit a loaded step would run among the jobs (0 when
        none is known)."""
        return max((self._expected_seconds(j, kind, kind in (LOSS, LOSS_SLICE))
                    for j in self._runnable() for kind in [j.next_kind()]), default=0.0)

    def take_events(self) -> list[TrainEvent]:
        events, self.events = self.events, []
        return events

    # -- a job -----------------------------------------------------------------------------
    def _start(self, spec: TrainJobSpec) -> None:
        if spec.job_id in self.jobs:
            return
        try:
            base = self.base
            job_dir = Path(spec.job_dir)
            state = None
            init_dir = Path(spec.init_adapter_dir)
            if spec.resume:  # the last checkpoint: trainer_state.pt names its step
                state = torch.load(job_dir / TRAINER_STATE, weights_only=False)
                init_dir = job_dir / f"step-{state['step']}"
            lora = LoraParams.from_peft_dir(init_dir, base.config, dtype=torch.float32)
            # LoRA dropout comes with the adapter (its adapter_config.json lora_dropout).
            settings = dict(spec.settings)
            if "betas" in settings:  # a list after the msgpack trip
                settings["betas"] = tuple(settings["betas"])
            settings = TrainingSettings(**settings)
            trainer = LoraTrainer(base, lora, settings)
            steps = load_steps(job_dir / BATCHES_FILE)
            if not steps:
                raise JobFailed("the job has no micro-batches")
            validation_file = job_dir / VALIDATION_BATCHES_FILE
            validation_batches = load_batches(validation_file) if validation_file.exists() else []
            rng = torch.Generator().manual_seed(spec.seed).get_state()
            if state is not None:
                trainer.load_state_dict(state["trainer"])
                rng = state["rng"]
        except Exception as exc:
            self.events.append(TrainEvent(spec.job_id, "failed", 0, {"message": f"could not start: {exc}"}))
            return
        job = _Job(spec, lora, trainer, steps, rng, validation_batches=validation_batches)
        self.jobs[spec.job_id] = job
        resumed_at = trainer.steps_done
        if spec.resume and validation_batches and resumed_at and resumed_at not in spec.validated_steps:
            # The restart came between this version's publish and the end of its validation.
            job.validation = _Validation(resumed_at, self._evaluation_pass(job, 0))
        # Tokens of the steps done (a resumed job's): the server may not have seen their
        # events (it went down after the checkpoint was written, before it recorded them).
        epochs, cycle = divmod(trainer.steps_done, len(steps))
        trained = sum(step_totals(step)[0] * (epochs + (index < cycle)) for index, step in enumerate(steps))
        self._event(job, "started", step=trainer.steps_done, parameters=lora.num_parameters(),
                    threads=torch.get_num_threads(), trained_tokens=trained)

    def _run_unit(self, job: _Job, kind: str, rows: int | None = None, vocab: int | None = None) -> str | None:
        """Run `job`'s next unit; returns the kind of pass unit it was (None for the others)."""
        if kind == PUBLISH:
            self._publish(job)
            return None
        if kind == CHECKPOINT:
            self._checkpoint(job)
            return None
        if job.validation is not None:
            return self._validation_unit(job, rows, vocab)
        if job.unit_pass is None:
            if job.micro == 0:  # a new optimizer step
                job.trainer.zero_grad()
                job.pass_lr, job.pass_seconds, job.step_loss = job.trainer.lr, 0.0, 0.0
            batch = job.next_batch()
            # The budget is the worker's, shared by every job's micro-batch in flight.
            room = self.graph_budget_bytes - self._held_bytes(but=job)
            graph_layers = graph_layers_within(batch.seq_lens, self.base.config, room, **job.graph_kind)
            job.unit_pass = LayerSlicedPass(self.base, job.lora, batch, job.rng, graph_layers=graph_layers,
                                            loss_tokens=step_totals(job.next_step())[1])
        if kind != UPDATE:
            ran = job.unit_pass.run_unit(rows, vocab)
            loss = job.unit_pass.loss
            if loss is not None and ran in (LOSS, LOSS_SLICE) and not math.isfinite(loss):
                raise JobFailed(f"training loss is {loss} at step {job.trainer.steps_done + 1} "
                                f"(learning rate {job.pass_lr:g}); the job stopped")
            if job.unit_pass.done and job.micro + 1 < len(job.next_step()):
                self._end_pass(job)  # the step's next micro-batch: its gradients add to these
                job.micro += 1
            return ran
        unit_pass = self._end_pass(job)
        step = job.next_step()
        job.micro = 0
        record = job.trainer.update(step, job.step_loss, job.pass_lr, job.pass_seconds)
        job.updated_at, job.updated_step = time.time(), self._engine_step
        job.last_loss = record.loss
        self._event(job, "step", step=record.step, loss=record.loss, lr=record.lr, tokens=record.tokens,
                    loss_tokens=record.loss_tokens, seconds=record.seconds,
                    unit_ms={kind: round(s * 1000, 2) for kind, s in self.unit_seconds.items()},
                    # Layers whose graphs the pass kept from the start (the rest recomputed in
                    # backward), and at its end (fewer when a loan recall dropped some), of `layers`.
                    graph_layers=unit_pass.planned_graph_layers, graph_layers_at_end=unit_pass.graph_layers,
                    layers=unit_pass.num_layers)
        last = record.step >= job.spec.total_steps
        if last or record.step % job.spec.publish_every == 0:
            job.publish_due = True  # the next unit; the job finishes with its last publish

    @staticmethod
    def _end_pass(job: _Job) -> LayerSlicedPass:
        unit_pass, job.unit_pass = job.unit_pass, None
        if unit_pass.rng_state is not None:
            job.rng = unit_pass.rng_state
        job.step_loss += unit_pass.loss
        return unit_pass

    def _publish(self, job: _Job) -> None:
        step = job.trainer.steps_done
        if not all(bool(torch.isfinite(p).all()) for p in job.lora.parameters()):
            raise JobFailed(f"the LoRA weights became non-finite at step {step} "
                            f"(loss {job.last_loss:g} before the update); the job stopped")
        started = time.perf_counter()
        path = Path(job.spec.job_dir) / f"step-{step}"
        tensors = job.lora.peft_state_dict()  # one copy for the files and the host cache
        job.lora.save_peft(path, base_model_name_or_path=job.spec.base_model or self.base_model, tensors=tensors)
        files = None
        if self.host_cache is not None:
            files = self.host_cache.put_trained(job.spec.adapter_name, str(path), tensors)
        job.publish_due = False
        job.checkpoint_due = (step >= job.spec.total_steps
                              or time.monotonic() - job.checkpointed_at >= CHECKPOINT_EVERY_S)
        job.published.append(step)
        if job.validation_batches:  # the units after the checkpoint (if due) validate this version
            job.validation = _Validation(step, self._evaluation_pass(job, 0))
        # `files` (the identity the host-cache entry is keyed by) lets the scheduler serve
        # this version from the host cache at once (finetune/published_versions.py).
        self._event(job, "published", step=step, path=str(path), loss=job.last_loss,
                    seconds=time.perf_counter() - started, host_cached=files is not None,
                    files=files, updated_at=job.updated_at, updated_step=job.updated_step)

    def _checkpoint(self, job: _Job) -> None:
        """What a resume needs beside step-N (optimizer, schedule, dropout stream): a unit of its
        own after the publish, so the new version is served without waiting for it."""
        step = job.trainer.steps_done
        _save_atomic({"trainer": job.trainer.state_dict(), "rng": job.rng, "step": step},
                     Path(job.spec.job_dir) / TRAINER_STATE)
        job.checkpoint_due, job.checkpointed_at = False, time.monotonic()
        self._event(job, "checkpointed", step=step)
        if step >= job.spec.total_steps and job.validation is None:
            self._finish(job)

    def _evaluation_pass(self, job: _Job, index: int) -> LayerSlicedPass:
        return LayerSlicedPass(self.base, job.lora, job.validation_batches[index], evaluate=True)

    def _validation_unit(self, job: _Job, rows: int | None, vocab: int | None) -> str:
        """One unit of the validation in progress; the last one reports the loss of the whole set."""
        validation = job.validation
        started = time.perf_counter()
        ran = validation.unit_pass.run_unit(rows, vocab)
        validation.seconds += time.perf_counter() - started
        if not validation.unit_pass.done:
            return ran
        done = validation.unit_pass
        validation.loss_sum += done.loss * done.num_loss_tokens
        validation.loss_tokens += done.num_loss_tokens
        validation.index += 1
        if validation.index < len(job.validation_batches):
            validation.unit_pass = self._evaluation_pass(job, validation.index)
            return ran
        job.validation = None
        loss = validation.loss_sum / validation.loss_tokens
        if not math.isfinite(loss):
            raise JobFailed(f"validation loss is {loss} at step {validation.step}; the job stopped")
        self._event(job, "validated", step=validation.step, loss=loss, loss_tokens=validation.loss_tokens,
                    batches=len(job.validation_batches), seconds=validation.seconds)
        if job.trainer.steps_done >= job.spec.total_steps and not job.checkpoint_due:
            self._finish(job)
        return ran

    def _finish(self, job: _Job) -> None:
        self.jobs.pop(job.spec.job_id, None)
        self._event(job, "finished", step=job.trainer.steps_done)

    def _event(self, job: _Job, kind: str, step: int, **data) -> None:
        self.events.append(TrainEvent(job.spec.job_id, kind, step, data))


def _chunk_rows(kind: str) -> int:
    """Rows of the shortest unit of a row-wise kind (its expected time is kept per chunk)."""
    return LOSS_CHUNK if kind == LOSS else MLP_CHUNK


def keep_freed_memory() -> None:
    """Let glibc keep and reuse the memory training frees (CPU workers).

    A training unit allocates and frees tens of MB of activations; with glibc's defaults
    larger blocks are mmap'ed and every free returns memory to the system, so the next
    unit and the next inference step page-fault it back in (measured: units ~1.8x slower,
    inference around them slower too). Blocks up to 32 MiB now come from the heap, and the
    heap is not trimmed. No-op where mallopt is not available (not glibc).
    """
    c = libc()
    mallopt = getattr(c, "mallopt", None)
    if mallopt is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, (1 << 31) - 1)


def return_freed_memory() -> None:
    """Give the heap's free memory back to the OS now (glibc `malloc_trim`): after graphs are
    dropped for the KV cache, whose recalled pages fault RAM back in (paged/lent_pages.py)."""
    malloc_trim = getattr(libc(), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
