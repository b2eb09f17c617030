"""What the scheduler tells every worker about adapters, once per step.

The scheduler (EngineCore process) owns residency: which adapters hold which pool
blocks. Each step it sends an `SLoRAStepPlan` inside `SLoRASchedulerOutput` (a
`SchedulerOutput` subclass with one extra field, pickled to every TP rank as is).
Block ids are the same on every rank; each rank fills its own pages with its own shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AdapterPlacement:
    """One adapter and the pool blocks its weights occupy."""

    lora_int_id: int
    lora_name: str
    lora_path: str
    # Bumped when an adapter is re-registered under the same name (load_inplace); a
    # worker must refill pages and drop host-cache entries of older versions.
    version: int
    block_ids: tuple[int, ...]
    # Identity of the files the scheduler validated and sized (AdapterSpec.files): a
    # worker that finds other files fails this adapter instead of filling its pages.
    files: tuple = ()


@dataclass(frozen=True)
class AdapterSource:
    """Where a worker reads an adapter from (no blocks: it is not resident yet)."""

    lora_name: str
    lora_path: str
    version: int
    lora_int_id: int = 0
    files: tuple = ()


@dataclass(frozen=True)
class TrainJobSpec:
    """A co-served finetuning job (vllm_slora/finetune/coserve_*.py), handed to the workers once."""

    job_id: str
    adapter_name: str  # the model name its versions are served under (fine_tuned_model)
    job_dir: str  # holds batches.pt (packed micro-batches), step-N/ checkpoints, trainer_state.pt
    init_adapter_dir: str  # PEFT adapter the LoRA parameters start from (step-0 / an adapter continued)
    settings: dict  # TrainingSettings fields
    total_steps: int
    publish_every: int
    seed: int  # LoRA dropout stream
    base_model: str = ""  # base_model_name_or_path written into published adapter_config.json
    # Continue from job_dir/trainer_state.pt (optimizer, schedule, dropout stream) and the
    # step-N checkpoint it names; init_adapter_dir is then ignored.
    resume: bool = False
    paused: bool = False  # submitted paused (a paused job's restart): it runs once resumed
    # Steps whose version's validation loss the server holds (a resume): a job resumed from a
    # published step not among them validates that version first (the restart cut it short).
    validated_steps: list[int] = field(default_factory=list)


@dataclass
class TrainOrder:
    """What the workers' trainer does in this step (after the step's inference)."""

    start: list[TrainJobSpec] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)  # job ids: drop their state
    pause: list[str] = field(default_factory=list)  # job ids: keep their state, run nothing
    resume: list[str] = field(default_factory=list)  # job ids: paused ones run again
    # Seconds of training work this step may add; units whose expected time fits are run.
    budget_s: float = 0.0
    # No inference in this step: run at least one unit even if it is longer than the budget.
    idle: bool = False
    # Inference ran moments ago, so a request may arrive any time: keep every unit short
    # (an arrival waits for the unit in progress), even where a long one would be faster.
    short_units: bool = False
    # Shared counter of requests waiting in the EngineCore's input queue (finetune/arrivals.py):
    # the step ends before the next unit once one is. None: not watched (in-process engines).
    arrivals: str | None = None
    engine_step: int = 0  # the scheduler's step number (events say in which step a job did what)
    # Bytes of pool blocks lent to the jobs' kept layer graphs (pool/training_loan.py), from
    # this step on; 0 after a recall: drop them before this step's forward. None: no loans
    # (the worker keeps its own budget, slora.finetune_activation_mb).
    graph_bytes: int | None = None
    lent_blocks: list[int] = field(default_factory=list)  # block ids lent in this step


@dataclass
class TrainEvent:
    """One thing a co-served job did: kind is started / step / published / paused / resumed / failed / finished / cancelled."""

    job_id: str
    kind: str
    step: int = 0
    data: dict = field(default_factory=dict)


@dataclass
class SLoRAStepPlan:
    # Adapters whose pages must be filled before this step's forward (newly allocated,
    # or reclaimed and re-allocated since they were last filled).
    load: list[AdapterPlacement] = field(default_factory=list)
    # Adapters whose blocks were handed to someone else since the previous plan: their
    # pages no longer hold their weights.
    evicted: list[int] = field(default_factory=list)
    # Adapters of requests near the head of the waiting queue: workers read and pack them
    # into their host cache in the background, so the step that later loads them into
    # pages does not wait on the disk. The scheduler loads an adapter into pages only
    # after a worker report said it is ready.
    warm: list[AdapterSource] = field(default_factory=list)
    # Co-served finetuning: None when no job runs.
    train: TrainOrder | None = None


@dataclass
class SLoRAWorkerReport:
    """What the workers tell the scheduler after a step (rides on ModelRunnerOutput).

    Sent by the output rank; load failures are agreed on by every TP rank first, so a
    failure on any rank is reported. Lists hold what happened since the previous report.
    """

    # (lora_int_id, version) read and packed into the host cache: loadable without disk.
    ready: list[tuple[int, int]] = field(default_factory=list)
    # (lora_int_id, version, why) of adapters that could not be read or put into pages
    # (the message names the TP rank).
    failed: list[tuple[int, int, str]] = field(default_factory=list)
    # (lora_int_id, version) the host cache no longer holds.
    dropped: list[tuple[int, int]] = field(default_factory=list)
    # Cumulative host-cache figures of the reporting rank: hits, misses, bytes, entries, warmed.
    host_cache: dict = field(default_factory=dict)
    disk_read_seconds: list[float] = field(default_factory=list)  # disk -> packed host copy
    pool_copy_seconds: list[float] = field(default_factory=list)  # host copy -> pool pages
    # Co-served finetuning (None when no job ran or was asked for): events, and the
    # seconds this step spent on inference (execute + sample) and on training units.
    training: list[TrainEvent] | None = None
    inference_seconds: float = 0.0
    train_seconds: float = 0.0
    train_units: int = 0
    # The longest expected unit of the next jobs (how much budget a step must grant).
    next_unit_seconds: float = 0.0
    # Training ended this step early because a request arrived (finetune/arrivals.py).
    train_cut_short: bool = False
    # Bytes of layer graphs the jobs' next (or current) micro-batches would keep (pool/training_loan.py).
    train_graph_bytes_wanted: int = 0
    # ... and one layer's graph of the largest of them: the smallest loan increment worth making.
    train_graph_layer_bytes: int = 0
