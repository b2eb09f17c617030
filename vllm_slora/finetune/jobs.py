"""Fine-tuning jobs of the OpenAI Fine-tuning API.

What runs where:
* In the server (``engine_call`` given, the engine started with slora.finetune=true), a
  job trains INSIDE the engine: the API process tokenizes and packs the data, writes the
  initial adapter (step-0) and ``batches.pt`` into the job directory and submits the job
  through the EngineCore utility ``slora_finetune``; the scheduler grants it the time
  inference leaves and the worker trains on views of the engine's own weights
  (coserve_planner.py, coserve_worker.py). One driver thread per job follows the engine's
  events (steps, published versions, the end) and serves each published version. Several
  jobs run at once and share the training time.
* Without an engine (tests, and ``require_engine=False`` callers), a job trains with
  `LoraTrainer` in ONE background thread of this process on its own float32 copy of the
  base weights (`base_weights_from_checkpoint`), one job at a time in creation order,
  with ``torch.set_num_threads(threads)`` (``VLLM_SLORA_FINETUNE_THREADS``, default 1).
  The server refuses jobs when its engine does not train (require_engine).

Life of a job:
* ``create`` checks everything it can before accepting the job (400 naming the problem):
  the training file exists and has purpose ``fine-tune``; ``model`` is a served base model
  (``"default"`` = the first ``--served-model-name``, unless a model is literally named
  "default") or a loaded LoRA adapter (training continues from its weights); the server
  has ``--enable-lora``; no tensor / pipeline parallelism and no quantization (the job's
  copy of the base weights is the whole unquantized model in this process); the
  hyperparameters (below) and the LoRA rank against ``--max-lora-rank``; then it tokenizes
  the file with the served tokenizer (lines longer than ``max_length`` are refused naming
  the line, or cut with ``truncate``). That happens inside the create call, so clients
  never see ``validating_files``.
* ``fine_tuned_model`` is set at creation: ``ft:<model>:<suffix>:<8 hex of the job id>``
  (``ft:<model>:<8 hex>`` without a suffix; OpenAI's pattern without the organization),
  and is servable as soon as create returns: the initial adapter (LoRA B = 0, so version 0
  answers exactly like the base model; a continued adapter's own weights) is written as
  PEFT files to ``<job dir>/step-0`` and loaded through the server's own adapter loading
  (`AdapterHost.load`, i.e. OpenAIServingModels.load_lora_adapter).
* Every ``publish_every`` optimizer steps and after the last step, the adapter is written
  to ``<job dir>/step-N`` and (a) ``fine_tuned_model`` is reloaded in place from it
  (``load_inplace``; a new path per version, so no prefix-cache entry of an older version
  is reused), (b) it is loaded as its own model ``<fine_tuned_model>:step-N``, listed by
  checkpoints.list.
* Every step is an event (type "metrics": loss, learning rate, trained tokens, step time).
  A non-finite loss (or non-finite weights before a publish) fails the job naming the step
  and the loss; the last published version keeps serving. Cancel stops a running job after
  its current step (nothing more is published) and a queued one at once.
* Finished jobs get a ``fine-tune-results`` file (CSV: step, loss, lr, tokens, seconds,
  validation loss).
* ``validation_file`` (an uploaded file of purpose ``fine-tune``, read with the training
  file's rules and packed the same way): every published version is evaluated on the whole
  set (token-mean cross-entropy, no dropout, no gradients), after its publish and before
  the next step trains (in the engine: forward-only units, coserve_worker.py). A metrics
  event per version ("full_valid_loss") and the checkpoint's metrics carry it. A job
  resumed after a restart first validates the version it resumes from if the server
  holds no validation loss for it (the restart cut that validation short).

Hyperparameters: OpenAI's ``n_epochs`` ("auto" = 3), ``batch_size`` (examples per
optimizer step; "auto" = pack whole examples into ``batch_tokens``-token micro-batches)
and ``learning_rate_multiplier`` (x 2e-4; "auto" = 1), plus the extensions in `EXTENSIONS`,
accepted in ``method.supervised.hyperparameters``, the legacy ``hyperparameters`` or a
top-level ``slora`` object (``extra_body={"slora": {...}}`` in the openai client).
With ``batch_size`` set, a step's examples are packed into micro-batches of at most
``batch_tokens`` tokens and their gradients accumulated (the loss a token mean over the
whole step), so a step of any size takes the memory of one micro-batch.

Restarts: every job keeps a record (<job dir>/job.json); `restore` (server start) serves
each job's last published version again and resumes unfinished in-engine jobs from their
last checkpoint (optimizer state and step in trainer_state.pt).

Not done: DPO / reinforcement, the server's ``--chat-template`` override
for ``messages`` data (the tokenizer's own template is used).
"""

from __future__ import annotations

import asyncio
import csv
import io
import math
import os
import queue
import re
import secrets
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..adapters.modules import SLICE_ORDER
from .data import TrainingDataError, examples_from_records, load_training_file, read_jsonl
from .files import FINE_TUNE, FINE_TUNE_RESULTS, ApiError, FileStore, page_after

ENV_FINETUNE_THREADS = "VLLM_SLORA_FINETUNE_THREADS"
BASE_LEARNING_RATE = 2e-4  # x learning_rate_multiplier
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_TOKENS = 2048
DEFAULT_RANK = 8
MAX_PUBLISH_EVERY_DEFAULT = 100
PUBLISH_TIMEOUT_S = 600.0
ORGANIZATION = "vllm-slora"
STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
# Figures of an in-engine step event that the job's step events carry on (coserve_worker.py).
ENGINE_STEP_FIGURES = ("unit_ms", "graph_layers", "graph_layers_at_end", "layers")
OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
EXTENSIONS = {
    "lora_rank": "LoRA rank r (default min(8, --max-lora-rank))",
    "lora_alpha": "LoRA alpha (default 2 x rank)",
    "lora_dropout": "LoRA dropout in [0, 1) (default 0)",
    "target_modules": f"projections to adapt, a subset of {list(SLICE_ORDER)} (default all)",
    "use_rslora": "rank-stabilized scaling alpha / sqrt(r) (default false)",
    "batch_tokens": "token budget of a packed micro-batch (default min(2048, max_model_len)): one per step when "
                    "batch_size is auto; with batch_size, a step's examples in as many as they need, gradients accumulated",
    "max_length": "longest example in tokens (default min(batch_tokens, max_model_len))",
    "truncate": "cut examples longer than max_length instead of refusing them (default false)",
    "max_steps": "optimizer steps to run (default n_epochs x steps per epoch)",
    "publish_every": "publish a servable version every N steps (default min(steps per epoch, 100))",
    "learning_rate": "absolute learning rate (instead of learning_rate_multiplier)",
    "warmup_steps": "linear warmup steps (default 0)",
    "weight_decay": "AdamW weight decay (default 0.01)",
    "max_grad_norm": "clip the global gradient norm (default off)",
}
_SUFFIX = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class PublishError(RuntimeError):
    """The engine refused an adapter load; `status` is the HTTP status it answered."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


class _PublishFailed(RuntimeError):
    pass


# Sends one co-served finetuning action to the engine (EngineCore utility `slora_finetune`).
EngineCall = Callable[[str, dict], Awaitable[dict]]
# The driver thread polls the engine for a job's events (an EngineCore utility call, answered
# between steps): soon again right after events (a step's publish follows it), then less and
# less often while nothing comes, down to once per ENGINE_POLL_MAX_S. Each poll costs the
# API server and the EngineCore a little CPU; a fixed 20 ms made one call per engine step
# under load. (Suspected of the job's latency cost at share 0, which interleaved runs showed
# to be this machine's drift over time, not the job: benchmarks/bench_coserve.py.) Cancel,
# pause and resume do not wait for the next poll (they wake the wait).
ENGINE_POLL_S = 0.02
ENGINE_POLL_MAX_S = 0.5
JOB_RECORD = "job.json"
MAX_PERSISTED_EVENTS = 200


class AdapterHost(Protocol):
    """Where published versions are served (the API server's OpenAIServingModels; a fake in tests)."""

    async def load(self, name: str, path: str, replace: bool) -> None:
        """Serve the PEFT adapter at `path` as model `name` (`replace`: reload in place). Raises PublishError."""

    def path_of(self, name: str) -> str | None:
        """The directory of the loaded LoRA adapter called `name`, None when there is none."""


@dataclass(frozen=True)
class EngineInfo:
    """What job validation needs to know about the serving engine."""

    served_models: tuple[str, ...]  # base model names; the first is what "default" means
    model_dir: str  # local directory with config.json + *.safetensors
    tokenizer: str  # what AutoTokenizer.from_pretrained takes
    max_model_len: int
    max_lora_rank: int | None  # None: the server runs without --enable-lora
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    quantization: str | None = None
    trust_remote_code: bool = False


@dataclass
class Job:
    id: str
    created_at: int
    model: str
    training_file: str
    fine_tuned_model: str
    seed: int
    suffix: str | None
    metadata: dict | None
    hyperparameters: dict
    method_hyperparameters: dict
    dir: Path
    total_steps: int
    publish_every: int
    status: str = "queued"
    error: dict | None = None
    finished_at: int | None = None
    estimated_finish: int | None = None
    trained_tokens: int = 0
    result_files: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    records: list = field(default_factory=list)  # StepRecord per step
    published_step: int = 0
    # The last step counted in trained_tokens: a job resumed from an older optimizer
    # checkpoint (coserve_worker.CHECKPOINT_EVERY_S) trains some steps again; they count once.
    recorded_step: int = 0
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    started: bool = False  # its first step began (a resumed job is "running" again, else "queued")
    # Wakes the job's driver / training thread at once: cancel, pause, resume.
    wake: threading.Event = field(default_factory=threading.Event)
    validation_file: str | None = None
    # Training inputs, dropped when the job ends.
    lora: Any = None
    batches: list | None = None  # an epoch of optimizer steps, each a list of packed micro-batches
    validation_batches: list | None = None
    settings: Any = None

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "object": "fine_tuning.job",
            "created_at": self.created_at,
            "error": self.error,
            "fine_tuned_model": self.fine_tuned_model,
            "finished_at": self.finished_at,
            "hyperparameters": dict(self.hyperparameters),
            "model": self.model,
            "organization_id": ORGANIZATION,
            "result_files": list(self.result_files),
            "seed": self.seed,
            "status": self.status,
            "trained_tokens": self.trained_tokens,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "estimated_finish": self.estimated_finish,
            "integrations": [],
            "metadata": self.metadata,
            "method": {"type": "supervised", "supervised": {"hyperparameters": dict(self.method_hyperparameters)}},
            "user_provided_suffix": self.suffix,
        }


@dataclass(frozen=True)
class _Plan:
    """A job's settings, resolved before its data is read."""

    lora_rank: int | None  # None: taken from the adapter training continues from
    lora_alpha: float | None
    lora_dropout: float
    target_modules: tuple[str, ...] | None
    use_rslora: bool
    batch_size: int | None  # examples per optimizer step; None = one packed micro-batch per step
    batch_tokens: int
    max_length: int
    truncate: bool
    n_epochs: int | None  # None = "auto"
    max_steps: int | None
    publish_every: int | None
    learning_rate: float
    learning_rate_multiplier: float | None
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float | None


def finetune_threads() -> int:
    raw = os.environ.get(ENV_FINETUNE_THREADS, "1")
    try:
        threads = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_FINETUNE_THREADS} must be a positive integer, got {raw!r}") from None
    if threads < 1:
        raise ValueError(f"{ENV_FINETUNE_THREADS} must be a positive integer, got {raw!r}")
    return threads


class FineTuningJobs:
    """Create / retrieve / list / cancel jobs, their events and checkpoints; runs them in one thread.

    `create` must be awaited on the event loop that `host.load` belongs to (the server's);
    the training thread publishes through that loop. The other methods are plain calls.
    """

    def __init__(
        self, root: str | os.PathLike, engine: EngineInfo, files: FileStore, host: AdapterHost, threads: int = 1,
        engine_call: EngineCall | None = None, require_engine: bool = False,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.engine, self.files, self.host, self.threads = engine, files, host, threads
        # Given: jobs train inside the engine (co-served, one driver thread per job);
        # None: in this process's training thread (tests, offline), unless require_engine.
        self.engine_call = engine_call
        self.require_engine = require_engine
        self._drivers: list[threading.Thread] = []
        self._jobs: dict[str, Job] = {}  # creation order
        self._lock = threading.RLock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tokenizer = None
        self._tokenizer_lock = threading.Lock()
        self._base = None  # BaseWeights shared by consecutive jobs, dropped when the queue runs dry

    # -- the tokenizer and the training-file check of uploads --------------------------------
    def tokenizer(self):
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(
                    self.engine.tokenizer, trust_remote_code=self.engine.trust_remote_code
                )
            return self._tokenizer

    def check_training_file(self, path: Path, filename: str) -> None:
        """The upload check of purpose fine-tune: JSONL, one object per line in one known format."""
        tokenizer = self.tokenizer()
        try:
            records = read_jsonl(path)
            with self._tokenizer_lock:  # HF fast tokenizers are not safe to share across threads
                examples_from_records(records, tokenizer, max_length=1 << 30, source=filename)
        except TrainingDataError as e:
            raise ApiError(400, str(TrainingDataError(filename, e.line, e.problem)), param="file",
                           code="invalid_training_file") from None

    # -- create ------------------------------------------------------------------------------
    async def create(self, body: Any) -> dict:
        self._loop = asyncio.get_running_loop()
        if not isinstance(body, Mapping):
            raise ApiError(400, "the request body must be a JSON object")
        self._check_engine()
        if body.get("integrations"):
            raise ApiError(400, "'integrations' is not supported by this server yet", param="integrations")
        model, continue_from = self._resolve_model(body.get("model"))
        training_file = body.get("training_file")
        if not isinstance(training_file, str) or not training_file:
            raise ApiError(400, "'training_file' (the id of an uploaded file) is required", param="training_file")
        stored = self._fine_tune_file(training_file, "training_file")
        validation = body.get("validation_file")
        if validation is not None and (not isinstance(validation, str) or not validation):
            raise ApiError(400, "'validation_file' must be the id of an uploaded file", param="validation_file")
        validation = self._fine_tune_file(validation, "validation_file") if validation else None
        plan = self._plan(body, continue_from is not None)
        suffix = _suffix(body.get("suffix"))
        metadata = _metadata(body.get("metadata"))
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(1 << 31)
        elif type(seed) is not int or seed < 0:
            raise ApiError(400, f"'seed' must be a non-negative integer, got {seed!r}", param="seed")

        job_id = f"ftjob-{secrets.token_hex(12)}"
        name = f"ft:{model}:{suffix}:{job_id[-8:]}" if suffix else f"ft:{model}:{job_id[-8:]}"
        job_dir = self.root / job_id
        job = await asyncio.to_thread(self._prepare, job_id, name, model, stored, validation, plan, seed,
                                      continue_from, job_dir, suffix, metadata)
        try:
            await self.host.load(name, str(job_dir / "step-0"), replace=False)
        except PublishError as e:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise ApiError(e.status if 400 <= e.status < 600 else 500,
                           f"could not serve the initial adapter of {name}: {e}") from None
        self._event(job, f"Serving {name} (version 0: "
                    + ("the weights of adapter " + repr(model) if continue_from else "the base model's outputs") + ")")
        if self.engine_call is not None:
            from .coserve_worker import BATCHES_FILE, VALIDATION_BATCHES_FILE
            from .packing import save_batches, save_steps

            await asyncio.to_thread(save_steps, job.batches, job.dir / BATCHES_FILE)
            if job.validation_batches:
                await asyncio.to_thread(save_batches, job.validation_batches, job.dir / VALIDATION_BATCHES_FILE)
                job.validation_batches = None  # the engine's worker reads them
            job.lora = None  # the engine's worker holds the trained copy
            with self._lock:
                self._jobs[job.id] = job
                self._event(job, "Job queued in the engine (trains in the time inference leaves)")
            self._persist(job)
            driver = threading.Thread(target=self._train, args=(job,), name=f"vllm-slora-{job.id}", daemon=True)
            self._drivers.append(driver)
            driver.start()
            return self.retrieve(job.id)
        with self._lock:
            self._jobs[job.id] = job
            self._event(job, "Job queued" + (f" behind {self._queue.qsize()} job(s)" if self._queue.qsize() else ""))
        self._start_thread()
        self._queue.put(job)
        return self.retrieve(job.id)

    def _fine_tune_file(self, file_id: str, param: str):
        """The stored upload `file_id` for `param` (training_file / validation_file): 400 unless it
        exists with purpose fine-tune."""
        try:
            stored = self.files.get(file_id)
        except ApiError:
            raise ApiError(400, f"{param} {file_id!r}: no such file (upload it with purpose "
                           "'fine-tune' first)", param=param, code="file_not_found") from None
        if stored.purpose != FINE_TUNE:
            raise ApiError(400, f"{param} {file_id!r} has purpose {stored.purpose!r}; "
                           f"fine-tuning needs a file uploaded with purpose {FINE_TUNE!r}", param=param)
        return stored

    def _check_engine(self) -> None:
        e = self.engine
        if e.max_lora_rank is None:
            raise ApiError(400, "this server was started without --enable-lora; fine-tuned models are served as "
                           "LoRA adapters: restart it with --enable-lora --max-lora-rank R")
        if self.require_engine and self.engine_call is None:
            raise ApiError(400, "this server does not co-serve fine-tuning: jobs train inside the engine on its own "
                           "weights, which it keeps only when started with slora.finetune=true "
                           "(--additional-config '{\"slora\": {\"finetune\": true}}')")
        if e.tensor_parallel_size > 1 or e.pipeline_parallel_size > 1:
            raise ApiError(400, f"fine-tuning is not supported with tensor_parallel_size={e.tensor_parallel_size} / "
                           f"pipeline_parallel_size={e.pipeline_parallel_size} yet: the training forward has no "
                           "differentiable collectives, so a job needs the whole model on one device; run it on a "
                           "single-device server")
        if e.quantization:
            raise ApiError(400, f"fine-tuning a quantized base model ({e.quantization}) is not supported yet")

    def _resolve_model(self, model: Any) -> tuple[str, str | None]:
        """(model name, adapter dir to continue from or None)."""
        served = self.engine.served_models
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required: a served base model (or 'default') or a loaded LoRA adapter",
                           param="model")
        if model in served:
            return model, None
        if model == "default":
            return served[0], None
        adapter = self.host.path_of(model)
        if adapter is not None:
            return model, adapter
        raise ApiError(400, f"model {model!r} is not served here: fine-tune one of {', '.join(map(repr, served))} "
                       "(or 'default'), or a loaded LoRA adapter to continue training it",
                       param="model", code="model_not_found")

    def _plan(self, body: Mapping, continuing: bool) -> _Plan:
        values, where = _hyperparameters(body)
        engine = self.engine

        def get(key, parse, default):
            return parse(values[key], where[key]) if key in values and values[key] != "auto" else default

        lora_keys = [k for k in ("lora_rank", "lora_alpha", "target_modules", "use_rslora", "lora_dropout") if k in values]
        if continuing and lora_keys:
            raise ApiError(400, f"{where[lora_keys[0]]}: training continues from a loaded adapter, whose LoRA "
                           "settings are kept; leave out " + ", ".join(lora_keys), param=where[lora_keys[0]])
        rank = get("lora_rank", _positive_int, None if continuing else min(DEFAULT_RANK, engine.max_lora_rank))
        if rank is not None and rank > engine.max_lora_rank:
            raise ApiError(400, f"{where.get('lora_rank', 'lora_rank')}: LoRA rank {rank} is greater than the "
                           f"server's --max-lora-rank {engine.max_lora_rank}", param=where.get("lora_rank"),
                           code="rank_too_large")
        alpha = get("lora_alpha", _positive_number, None if rank is None else 2.0 * rank)
        dropout = get("lora_dropout", _fraction, 0.0)
        targets = get("target_modules", _targets, None if continuing else SLICE_ORDER)
        if "use_rslora" in values and type(values["use_rslora"]) is not bool:
            raise ApiError(400, f"{where['use_rslora']} must be true or false", param=where["use_rslora"])
        batch_size = get("batch_size", _positive_int, None)
        batch_tokens = get("batch_tokens", _positive_int, min(DEFAULT_BATCH_TOKENS, engine.max_model_len))
        max_length = get("max_length", _positive_int, min(batch_tokens, engine.max_model_len))
        if max_length < 2 or max_length > engine.max_model_len:
            raise ApiError(400, f"{where.get('max_length', 'max_length')} must be between 2 and the served "
                           f"max_model_len {engine.max_model_len}, got {max_length}", param=where.get("max_length"))
        if max_length > batch_tokens:
            raise ApiError(400, f"max_length {max_length} exceeds batch_tokens {batch_tokens}: such examples could "
                           "never be packed", param=where.get("max_length", where.get("batch_tokens")))
        if "truncate" in values and type(values["truncate"]) is not bool:
            raise ApiError(400, f"{where['truncate']} must be true or false", param=where["truncate"])
        multiplier = get("learning_rate_multiplier", _positive_number, None)
        if multiplier is not None and "learning_rate" in values:
            raise ApiError(400, f"give {where['learning_rate_multiplier']} or {where['learning_rate']}, not both",
                           param=where["learning_rate"])
        learning_rate = get("learning_rate", _positive_number, BASE_LEARNING_RATE * (multiplier or 1.0))
        return _Plan(
            lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
            use_rslora=bool(values.get("use_rslora", False)), batch_size=batch_size, batch_tokens=batch_tokens,
            max_length=max_length, truncate=bool(values.get("truncate", False)),
            n_epochs=get("n_epochs", _positive_int, None), max_steps=get("max_steps", _positive_int, None),
            publish_every=get("publish_every", _positive_int, None), learning_rate=learning_rate,
            learning_rate_multiplier=multiplier, warmup_steps=get("warmup_steps", _non_negative_int, 0),
            weight_decay=get("weight_decay", _non_negative_number, 0.01),
            max_grad_norm=get("max_grad_norm", _positive_number, None),
        )

    def _examples(self, stored, plan: _Plan, param: str) -> list:
        """The tokenized examples of an uploaded file (400 naming `param`, the file and the line)."""
        tokenizer = self.tokenizer()
        try:
            with self._tokenizer_lock:
                return load_training_file(self.files.content_path(stored.id), tokenizer, plan.max_length,
                                          truncate=plan.truncate)
        except TrainingDataError as e:
            raise ApiError(400, str(TrainingDataError(f"{stored.filename} ({stored.id})", e.line, e.problem)),
                           param=param, code=f"invalid_{param}") from None

    def _prepare(self, job_id, name, model, stored, validation, plan: _Plan, seed, continue_from, job_dir, suffix,
                 metadata):
        """Blocking part of create (worker thread): tokenize, pack, build the LoRA, write step-0."""
        from .lora_params import LoraParams, LoraSettings
        from .model_config import DecoderConfig
        from .packing import pack_examples, step_micro_batches, step_totals
        from .trainer import TrainingSettings

        examples = self._examples(stored, plan, "training_file")
        steps = step_micro_batches(examples, plan.batch_size, plan.batch_tokens)
        validation_examples = self._examples(validation, plan, "validation_file") if validation else []
        validation_batches = pack_examples(validation_examples, plan.batch_tokens) if validation else []
        per_epoch = len(steps)
        total = plan.max_steps or (plan.n_epochs or DEFAULT_EPOCHS) * per_epoch
        publish_every = plan.publish_every or max(1, min(per_epoch, MAX_PUBLISH_EVERY_DEFAULT))
        try:
            config = DecoderConfig.from_hf(self.engine.model_dir)
            if continue_from is None:
                lora = LoraParams.init(config, LoraSettings(
                    r=plan.lora_rank, alpha=plan.lora_alpha, target_modules=tuple(plan.target_modules),
                    use_rslora=plan.use_rslora, dropout=plan.lora_dropout,
                ), seed=seed)
            else:
                lora = LoraParams.from_peft_dir(continue_from, config)
        except (ValueError, KeyError, OSError) as e:
            raise ApiError(400, f"cannot fine-tune {model!r}: {e}", param="model") from None
        if max(m.rank for m in lora.modules.values()) > self.engine.max_lora_rank:
            raise ApiError(400, f"adapter {model!r} has rank above the server's --max-lora-rank "
                           f"{self.engine.max_lora_rank}", param="model", code="rank_too_large")
        lora.save_peft(job_dir / "step-0", base_model_name_or_path=self.engine.model_dir)
        s = lora.settings
        method = {
            "n_epochs": plan.n_epochs or (math.ceil(total / per_epoch) if plan.max_steps else DEFAULT_EPOCHS),
            "batch_size": plan.batch_size or "auto",
            "learning_rate_multiplier": plan.learning_rate / BASE_LEARNING_RATE,
            "lora_rank": s.r, "lora_alpha": s.alpha, "lora_dropout": s.dropout,
            "target_modules": list(s.target_modules), "use_rslora": s.use_rslora,
            "batch_tokens": plan.batch_tokens, "max_length": plan.max_length,
            "truncate": plan.truncate, "max_steps": total, "publish_every": publish_every,
            "learning_rate": plan.learning_rate, "warmup_steps": plan.warmup_steps,
            "weight_decay": plan.weight_decay, "max_grad_norm": plan.max_grad_norm,
        }
        job = Job(
            id=job_id, created_at=int(time.time()), model=model, training_file=stored.id, fine_tuned_model=name,
            seed=seed, suffix=suffix, metadata=metadata,
            hyperparameters={k: method[k] for k in OPENAI_HYPERPARAMETERS}, method_hyperparameters=method,
            dir=job_dir, total_steps=total, publish_every=publish_every, lora=lora, batches=steps,
            validation_file=validation.id if validation else None, validation_batches=validation_batches or None,
            settings=TrainingSettings(
                max_steps=total, lr=plan.learning_rate, weight_decay=plan.weight_decay,
                warmup_steps=plan.warmup_steps, max_grad_norm=plan.max_grad_norm,
            ),
        )
        self._event(job, f"Created fine-tuning job {job_id}")
        micro_batches = sum(len(step) for step in steps)
        self._event(job, f"Validated training file {stored.id}: {len(examples)} examples, {per_epoch} steps per epoch "
                    f"({micro_batches} micro-batches), {sum(step_totals(step)[0] for step in steps)} tokens; "
                    f"{total} steps, a version published every {publish_every} steps")
        if validation:
            self._event(job, f"Validated validation file {validation.id}: {len(validation_examples)} examples, "
                        f"{len(validation_batches)} micro-batches, "
                        f"{sum(b.num_loss_tokens for b in validation_batches)} loss tokens; every published version "
                        "is evaluated on all of it")
        return job

    # -- reading -----------------------------------------------------------------------------
    # -- the engine's co-serving settings and state ------------------------------------------
    async def coserve(self, settings: Any = None) -> dict:
        """The engine's co-serving state (settings, training and loan counters); with
        `settings` (e.g. ``{"slack": 0.5}``) it changes them first, while serving."""
        if self.engine_call is None:
            raise ApiError(400, "this server does not co-serve fine-tuning (started without slora.finetune=true)")
        if settings is not None:
            from vllm_slora.config import coserve_settings_problem

            if not isinstance(settings, Mapping):
                raise ApiError(400, "the request body must be a JSON object, e.g. {\"slack\": 0.5}")
            if problem := coserve_settings_problem(settings):
                raise ApiError(400, problem[1], param=problem[0])
            await self.engine_call("configure", dict(settings))
        return {"object": "fine_tuning.coserve", **await self.engine_call("stats", {})}

    def _job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"fine-tuning job {job_id!r} not found", param="fine_tuning_job_id",
                           code="job_not_found")
        return job

    def retrieve(self, job_id: str) -> dict:
        job = self._job(job_id)
        with self._lock:
            return job.to_openai()

    def list(self, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Newest first, as OpenAI lists jobs."""
        with self._lock:
            jobs = list(reversed(self._jobs.values()))
            chosen, more = page_after(jobs, after, limit, lambda j: j.id, "after")
            return [j.to_openai() for j in chosen], more

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        job = self._job(job_id)
        with self._lock:
            events = list(reversed(job.events))
        chosen, more = page_after(events, after, limit, lambda e: e["id"], "after")
        return [dict(e) for e in chosen], more

    def checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[dict], bool]:
        job = self._job(job_id)
        with self._lock:
            checkpoints = list(reversed(job.checkpoints))
        chosen, more = page_after(checkpoints, after, limit, lambda c: c["id"], "after")
        return [dict(c) for c in chosen], more

    # -- cancel ------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> dict:
        job = self._job(job_id)
        with self._lock:
            if job.status in TERMINAL:
                raise ApiError(400, f"fine-tuning job {job_id} has already {job.status} and cannot be cancelled",
                               param="fine_tuning_job_id")
            job.cancel_requested.set()
            job.wake.set()
            job.status = "cancelled"
            job.estimated_finish = None
            if job.started:
                self._event(job, "Cancellation requested: the job stops after its current step")
            else:
                self._finish(job, f"Job cancelled before it started; {job.fine_tuned_model} keeps serving version 0")
            return job.to_openai()

    # -- pause / resume ----------------------------------------------------------------------
    def pause(self, job_id: str) -> dict:
        """Pause a queued or running job: it stops after the engine step (or, trained in this
        process, the optimizer step) in progress, keeps its weights, optimizer state and place
        in the data, and gives its activation memory back; its versions keep serving."""
        return self._set_paused(job_id, True)

    def resume(self, job_id: str) -> dict:
        """Resume a paused job where it stopped."""
        return self._set_paused(job_id, False)

    def _set_paused(self, job_id: str, paused: bool) -> dict:
        job = self._job(job_id)
        with self._lock:
            allowed = ("queued", "running") if paused else ("paused",)
            if job.status not in allowed:
                raise ApiError(400, f"fine-tuning job {job_id} is {job.status} and cannot be "
                               f"{'paused' if paused else 'resumed'} (only {' or '.join(allowed)} jobs can)",
                               param="fine_tuning_job_id")
            if paused:
                job.status = "paused"
                job.estimated_finish = None
                self._event(job, f"Job paused after step {job.recorded_step}; "
                            f"{job.fine_tuned_model} keeps serving step {job.published_step}")
            else:
                job.status = "running" if job.started else "queued"
                self._event(job, f"Job resumed at step {job.recorded_step}")
            job.wake.set()
            answer = job.to_openai()
        self._persist(job)
        return answer

    # -- the training thread -----------------------------------------------------------------
    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="vllm-slora-finetune", daemon=True)
                self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Cancel every unfinished job and stop the thread (tests; the server just exits)."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.status not in TERMINAL]
        for job in jobs:
            try:
                self.cancel(job.id)
            except ApiError:
                pass
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        for driver in self._drivers:
            driver.join(timeout)

    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._train(job)
            finally:
                with self._lock:
                    job.lora = job.batches = job.validation_batches = None
                if self._queue.empty():
                    self._base = None  # the weights copy is freed between bursts of jobs

    def _base_weights(self):
        if self._base is None:
            import torch

            from .base_weights import base_weights_from_checkpoint

            self._base = base_weights_from_checkpoint(self.engine.model_dir, dtype=torch.float32)
        return self._base

    def _train(self, job: Job, resume: bool = False) -> None:
        if self.engine_call is not None:
            try:
                self._train_in_engine(job, resume)
            except _PublishFailed as e:
                self._fail(job, "publish_failed", str(e))
            except Exception as e:  # the engine refused or went away: this job fails, the server goes on
                self._fail(job, "training_error", f"{type(e).__name__}: {e}")
            finally:
                job.batches = None
            return
        import torch

        from .trainer import LoraTrainer

        with self._lock:
            if job.status not in ("queued", "paused"):
                return
            job.started = True
            if job.status == "queued":
                job.status = "running"
            self._event(job, "Fine-tuning job started")
        try:
            base = self._base_weights()
            torch.manual_seed(job.seed)  # LoRA dropout draws from the global generator
            trainer = LoraTrainer(base, job.lora, job.settings)
            while trainer.steps_done < job.total_steps and not job.cancel_requested.is_set():
                if job.status == "paused":
                    job.wake.wait()
                    job.wake.clear()
                    continue
                record = trainer.step(job.batches[trainer.steps_done % len(job.batches)])
                if not math.isfinite(record.loss):
                    self._fail(job, "training_diverged", f"training loss is {record.loss} at step {record.step} "
                               f"(learning rate {record.lr:g}); the job stopped")
                    return
                self._record_step(job, record)
                if job.cancel_requested.is_set():
                    break
                if record.step % job.publish_every == 0 or record.step == job.total_steps:
                    if not all(bool(torch.isfinite(p).all()) for p in job.lora.parameters()):
                        self._fail(job, "training_diverged", f"the LoRA weights became non-finite at step "
                                   f"{record.step} (loss {record.loss:g} before the update); the job stopped")
                        return
                    self._publish(job, record)
                    if job.validation_batches:
                        self._validate_in_process(job, base, record.step)
        except _PublishFailed as e:
            self._fail(job, "publish_failed", str(e))
            return
        except Exception as e:  # anything else: the job fails, the thread and the server go on
            self._fail(job, "training_error", f"{type(e).__name__}: {e}")
            return
        with self._lock:
            if job.cancel_requested.is_set():
                self._finish(job, f"Job cancelled after step {job.records[-1].step if job.records else 0}; "
                             f"{job.fine_tuned_model} keeps serving step {job.published_step}")
            else:
                job.status = "succeeded"
                self._finish(job, f"Fine-tuning job succeeded: {job.fine_tuned_model} serves step {job.published_step}")

    def _record_step(self, job: Job, record, engine: dict | None = None) -> None:
        with self._lock:
            job.records.append(record)
            if record.step > job.recorded_step:
                job.trained_tokens += record.tokens
                job.recorded_step = record.step
            mean = sum(r.seconds for r in job.records) / len(job.records)
            if job.status == "running":
                job.estimated_finish = int(time.time() + mean * (job.total_steps - record.step))
            self._event(job, f"Step {record.step}/{job.total_steps}: training loss={record.loss:.4f}", data={
                "step": record.step, "total_steps": job.total_steps, "train_loss": record.loss,
                "learning_rate": record.lr, "trained_tokens": job.trained_tokens, "step_tokens": record.tokens,
                "loss_tokens": record.loss_tokens, "step_seconds": record.seconds,
                # In-engine jobs: expected ms per unit kind, layers that kept their graphs.
                **(engine or {}),
            })

    def _publish(self, job: Job, record) -> None:
        path = job.dir / f"step-{record.step}"
        job.lora.save_peft(path, base_model_name_or_path=self.engine.model_dir)
        self._serve_version(job, record.step, path, record.loss)

    def _validate_in_process(self, job: Job, base, step: int) -> None:
        from .loss import validation_loss

        started = time.perf_counter()
        loss, tokens = validation_loss(base, job.lora, job.validation_batches)
        self._record_validation(job, step, loss, tokens, time.perf_counter() - started)

    def _record_validation(self, job: Job, step: int, loss: float, tokens: int, seconds: float) -> None:
        """The validation loss of the version published at `step`: an event, the checkpoint's metrics."""
        with self._lock:
            for checkpoint in job.checkpoints:
                if checkpoint["step_number"] == step:
                    checkpoint["metrics"]["full_valid_loss"] = loss
            self._event(job, f"Step {step}: validation loss={loss:.4f} ({tokens} tokens)", data={
                "step": step, "full_valid_loss": loss, "valid_loss_tokens": tokens, "valid_seconds": seconds})
        self._persist(job)

    def _serve_version(self, job: Job, step: int, path: Path, loss: float, trained_at: float | None = None,
                       servable_at: float | None = None) -> None:
        """Serve the adapter at `path` as fine_tuned_model (in place) and as `<fine_tuned_model>:step-N`.

        `servable_at`: when the engine itself started serving this version under the name
        (in-engine jobs); otherwise the in-place load below is what makes it servable.
        """
        checkpoint_name = f"{job.fine_tuned_model}:step-{step}"
        started = time.perf_counter()
        self._on_loop(self.host.load(job.fine_tuned_model, str(path), replace=True))
        if servable_at is None:
            servable_at = time.time()  # fine_tuned_model answers with this version from here on
        # A step trained again after a resume (same weights) replaces its earlier version.
        again = any(c["step_number"] == step for c in job.checkpoints)
        self._on_loop(self.host.load(checkpoint_name, str(path), replace=again))
        with self._lock:
            job.published_step = step
            job.checkpoints = [c for c in job.checkpoints if c["step_number"] != step]
            job.checkpoints.append(_checkpoint_record(job, step, loss))
            data = {"step": step, "publish_seconds": time.perf_counter() - started}
            if trained_at is not None:  # wall time from the optimizer step's weights to servable
                data["update_to_servable_seconds"] = servable_at - trained_at
            self._event(job, f"Published step {step}: {job.fine_tuned_model} now serves it, also served as "
                        f"{checkpoint_name}", data=data)
        self._persist(job)

    # -- jobs trained inside the engine ------------------------------------------------------
    def _train_in_engine(self, job: Job, resume: bool = False) -> None:
        """Submit the job to the engine, then follow its events until it ends (driver thread)."""
        import dataclasses

        from vllm_slora.step_plan import TrainJobSpec

        from .trainer import StepRecord

        spec = dataclasses.asdict(TrainJobSpec(
            job_id=job.id, adapter_name=job.fine_tuned_model, job_dir=str(job.dir),
            init_adapter_dir=str(job.dir / "step-0"), settings=dataclasses.asdict(job.settings),
            total_steps=job.total_steps, publish_every=job.publish_every, seed=job.seed,
            base_model=self.engine.model_dir, resume=resume,
            validated_steps=[c["step_number"] for c in job.checkpoints if "full_valid_loss" in c["metrics"]],
        ))
        with self._lock:
            if job.status not in ("queued", "paused"):
                return
            spec["paused"] = sent_paused = job.status == "paused"
        self._on_loop(self.engine_call("submit", spec))
        after, cancel_sent, interval = 0, False, ENGINE_POLL_S
        while True:
            if job.cancel_requested.is_set() and not cancel_sent:
                self._on_loop(self.engine_call("cancel", {"job_id": job.id}))
                cancel_sent, interval = True, ENGINE_POLL_S
            elif not cancel_sent and (job.status == "paused") != sent_paused:
                sent_paused = not sent_paused
                try:
                    self._on_loop(self.engine_call("pause" if sent_paused else "resume", {"job_id": job.id}))
                except Exception as e:  # e.g. the job ended in the engine meanwhile: the poll tells
                    from vllm_slora.compat import logger

                    logger.info("vllm-slora: %s of %s not applied: %s", "pause" if sent_paused else "resume", job.id, e)
                interval = ENGINE_POLL_S
            reply = self._on_loop(self.engine_call("poll", {"job_id": job.id, "after": after}))
            after = reply["next"]
            for event in reply["events"]:
                data, step = event["data"], event["step"]
                kind = event["kind"]
                if kind == "started":
                    with self._lock:
                        job.started = True
                        if step > job.recorded_step and "trained_tokens" in data:
                            # Resumed past what this server recorded (the last one went down
                            # before it saw those steps' events): they count now, once.
                            job.trained_tokens = max(job.trained_tokens, data["trained_tokens"])
                            job.recorded_step = step
                        if job.status == "queued":
                            job.status = "running"
                        self._event(job, f"Fine-tuning job started in the engine at step {step} "
                                    f"({data.get('parameters', 0)} LoRA parameters)")
                    self._persist(job)
                elif kind == "step":
                    self._record_step(job, StepRecord(step=step, loss=data["loss"], lr=data["lr"],
                                                      loss_tokens=data["loss_tokens"], tokens=data["tokens"],
                                                      seconds=data["seconds"]),
                                      engine={key: data[key] for key in ENGINE_STEP_FIGURES if key in data})
                elif kind == "published":
                    # The engine already gives the new version to every request that starts
                    # from the end of the step that published it (data["servable_at"],
                    # finetune/published_versions.py); loading it here keeps the server's
                    # own records (the name's path, `:step-N`, /v1/models) in step.
                    self._serve_version(job, step, Path(data["path"]), data["loss"],
                                        trained_at=data.get("updated_at"), servable_at=data.get("servable_at"))
                elif kind == "waiting":
                    self._event(job, f"Waiting for a training slot: {data['max_jobs']} job(s) train at once in this "
                                f"engine (slora.finetune_max_jobs), {data['ahead']} waiting before this one")
                elif kind == "validated":
                    self._record_validation(job, step, data["loss"], data["loss_tokens"], data["seconds"])
                elif kind == "served":
                    with self._lock:
                        steps = data.get("first_request_engine_steps")
                        self._event(job, f"Step {step} served its first request "
                                    f"{data['first_request_seconds'] * 1000:.0f} ms after the optimizer update"
                                    + (f" ({steps} engine step{'s' if steps != 1 else ''} later)"
                                       if steps is not None else ""),
                                    data={"step": step, **data})
                elif kind == "failed":
                    message = data.get("message", "training failed")
                    code = "training_diverged" if "non-finite" in message or "loss is" in message else "training_error"
                    self._fail(job, code, message)
                    return
                elif kind == "cancelled":
                    with self._lock:
                        self._finish(job, f"Job cancelled after step {step}; {job.fine_tuned_model} keeps serving "
                                     f"step {job.published_step}")
                    return
                elif kind == "finished":
                    with self._lock:
                        if job.status != "cancelled":
                            job.status = "succeeded"
                        self._finish(job, f"Fine-tuning job succeeded: {job.fine_tuned_model} serves step "
                                     f"{job.published_step}")
                    return
            if reply["status"] not in ("queued", "running", "paused"):
                return
            interval = ENGINE_POLL_S if reply["events"] else min(2 * interval, ENGINE_POLL_MAX_S)
            job.wake.wait(interval)
            job.wake.clear()

    def _on_loop(self, coro) -> Any:
        """Run a coroutine on the server's event loop and wait for its result (from a training thread)."""
        if self._loop is None or not self._loop.is_running():
            # A loop that stopped (the server shutting down) would never run it: this thread
            # would wait PUBLISH_TIMEOUT_S for nothing, and the coroutine be dropped unawaited.
            coro.close()
            raise _PublishFailed("publishing failed: the server's event loop is not running")
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result(PUBLISH_TIMEOUT_S)
        except PublishError as e:
            raise _PublishFailed(f"publishing failed: {e}") from None

    def _fail(self, job: Job, code: str, message: str) -> None:
        with self._lock:
            if job.status == "cancelled":
                self._finish(job, f"Cancelled job stopped: {message}", level="warn")
                return
            served = f"{job.fine_tuned_model} keeps serving step {job.published_step}"
            job.status = "failed"
            job.error = {"code": code, "message": f"{message}; {served}", "param": None}
            self._finish(job, f"Fine-tuning job failed: {message}; {served}", level="error")

    def _finish(self, job: Job, message: str, level: str = "info") -> None:
        """Terminal bookkeeping (status already set); called with the lock held."""
        job.finished_at = int(time.time())
        job.estimated_finish = None
        if job.records:
            try:
                stored = self.files.add_bytes("step_metrics.csv", FINE_TUNE_RESULTS,
                                              _results_csv(job.records, job.checkpoints))
                job.result_files.append(stored.id)
            except OSError:
                pass
        self._event(job, message, level=level)
        self._persist(job)

    def _persist(self, job: Job) -> None:
        """Write the job's record to <job dir>/job.json (atomic), so a restarted server knows it."""
        import dataclasses
        import json

        with self._lock:
            record = {
                "job": job.to_openai(), "total_steps": job.total_steps, "publish_every": job.publish_every,
                "published_step": job.published_step, "checkpoints": list(job.checkpoints),
                "recorded_step": job.recorded_step,
                "events": job.events[-MAX_PERSISTED_EVENTS:],
                "settings": dataclasses.asdict(job.settings) if job.settings is not None else None,
            }
        try:
            tmp = job.dir / f".{JOB_RECORD}.tmp"
            tmp.write_text(json.dumps(record))
            os.replace(tmp, job.dir / JOB_RECORD)
        except OSError as e:  # a full disk must not stop training; the record is best effort
            from vllm_slora.compat import logger

            logger.warning("vllm-slora: could not write the record of %s: %s", job.id, e)

    # -- after a restart ---------------------------------------------------------------------
    async def restore(self) -> list[str]:
        """Reload the jobs of a previous server run (their <job dir>/job.json); returns their ids.

        Every job's last published version is served again under its names. A job that was
        queued or running resumes inside the engine from its last checkpoint (optimizer
        state included: trainer_state.pt), or from step 0 when it had none; a paused one is
        handed to the engine paused and does so once resumed; without an engine either is
        marked failed, saying why.
        """
        import json

        from .coserve_worker import BATCHES_FILE, TRAINER_STATE
        from .trainer import TrainingSettings

        self._loop = asyncio.get_running_loop()
        restored = []
        for path in sorted(self.root.glob(f"*/{JOB_RECORD}"), key=lambda p: p.stat().st_mtime):
            try:
                record = json.loads(path.read_text())
                o = record["job"]
                job = Job(
                    id=o["id"], created_at=o["created_at"], model=o["model"], training_file=o["training_file"],
                    fine_tuned_model=o["fine_tuned_model"], seed=o["seed"], suffix=o["user_provided_suffix"],
                    metadata=o["metadata"], hyperparameters=o["hyperparameters"],
                    method_hyperparameters=o["method"]["supervised"]["hyperparameters"], dir=path.parent,
                    total_steps=record["total_steps"], publish_every=record["publish_every"], status=o["status"],
                    error=o["error"], finished_at=o["finished_at"], trained_tokens=o["trained_tokens"],
                    result_files=o["result_files"], events=record["events"], checkpoints=record["checkpoints"],
                    published_step=record["published_step"],
                    recorded_step=record.get("recorded_step", record["published_step"]),
                    validation_file=o.get("validation_file"),
                    settings=TrainingSettings(**{**record["settings"], "betas": tuple(record["settings"]["betas"])})
                    if record["settings"] else None,
                )
            except (OSError, ValueError, KeyError, TypeError) as e:
                from vllm_slora.compat import logger

                logger.warning("vllm-slora: skipping fine-tuning job record %s: %s", path, e)
                continue
            if job.id in self._jobs:
                continue
            if job.status not in TERMINAL and (recovered := _recover_unrecorded_versions(job)):
                self._event(job, f"Server restarted: step(s) {', '.join(map(str, recovered))} had been published but "
                            f"not recorded; {job.fine_tuned_model} serves step {job.published_step}")
            resume = (job.dir / TRAINER_STATE).exists()
            step_dir = job.dir / f"step-{job.published_step}"
            try:
                await self.host.load(job.fine_tuned_model, str(step_dir), replace=False)
                for checkpoint in job.checkpoints:
                    name = checkpoint["fine_tuned_model_checkpoint"]
                    await self.host.load(name, str(job.dir / f"step-{checkpoint['step_number']}"), replace=False)
            except PublishError as e:
                self._event(job, f"Server restarted: could not serve {job.fine_tuned_model} again: {e}", level="warn")
            with self._lock:
                self._jobs[job.id] = job
            restored.append(job.id)
            if job.status in TERMINAL:
                continue
            if self.engine_call is None or not (job.dir / BATCHES_FILE).exists() or job.settings is None:
                with self._lock:
                    job.status = "failed"
                    job.error = {"code": "server_restarted", "param": None, "message":
                                 "the server restarted while the job was unfinished and cannot resume it here "
                                 f"(it trains only inside an engine with slora.finetune=true); "
                                 f"{job.fine_tuned_model} keeps serving step {job.published_step}"}
                    self._finish(job, job.error["message"], level="error")
                continue
            where = "from the last checkpoint" if resume else "from step 0"
            if job.status == "paused":  # it stays paused; once resumed it trains on from there
                self._event(job, f"Server restarted: the job stays paused (it resumes {where})")
            else:
                job.status = "queued"
                self._event(job, "Server restarted: resuming " + where)
            self._persist(job)
            driver = threading.Thread(target=self._train, args=(job, resume), name=f"vllm-slora-{job.id}",
                                      daemon=True)
            self._drivers.append(driver)
            driver.start()
        return restored

    def _event(self, job: Job, message: str, level: str = "info", data: dict | None = None) -> None:
        with self._lock:
            job.events.append({
                "id": f"ftevent-{secrets.token_hex(12)}",
                "object": "fine_tuning.job.event",
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "data": data,
                "type": "metrics" if data is not None else "message",
            })


def _results_csv(records: Sequence, checkpoints: Sequence[dict]) -> bytes:
    """One row per step; the validation loss of the steps whose published version has one."""
    valid_losses = {c["step_number"]: c["metrics"]["full_valid_loss"] for c in checkpoints
                    if "full_valid_loss" in c["metrics"]}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["step", "train_loss", "learning_rate", "step_tokens", "loss_tokens", "step_seconds",
                     "full_valid_loss"])
    for r in records:
        valid = valid_losses.get(r.step)
        writer.writerow([r.step, f"{r.loss:.6f}", f"{r.lr:.6g}", r.tokens, r.loss_tokens, f"{r.seconds:.4f}",
                         "" if valid is None else f"{valid:.6f}"])
    return out.getvalue().encode()


# -- request parsing ---------------------------------------------------------------------------
def _hyperparameters(body: Mapping) -> tuple[dict[str, Any], dict[str, str]]:
    """Hyperparameter keys from the legacy field, method.supervised and `slora`, with where each came from."""
    sources: list[tuple[str, Any]] = []
    if body.get("hyperparameters") is not None:
        sources.append(("hyperparameters", body["hyperparameters"]))
    method = body.get("method")
    if method is not None:
        if not isinstance(method, Mapping):
            raise ApiError(400, "'method' must be an object", param="method")
        kind = method.get("type", "supervised")
        if kind != "supervised":
            raise ApiError(400, f"method.type {kind!r} is not supported: only 'supervised' fine-tuning runs here",
                           param="method.type")
        supervised = method.get("supervised") or {}
        if not isinstance(supervised, Mapping):
            raise ApiError(400, "method.supervised must be an object", param="method.supervised")
        if supervised.get("hyperparameters") is not None:
            sources.append(("method.supervised.hyperparameters", supervised["hyperparameters"]))
    if body.get("slora") is not None:
        sources.append(("slora", body["slora"]))
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    allowed = (*OPENAI_HYPERPARAMETERS, *EXTENSIONS)
    for prefix, given in sources:
        if not isinstance(given, Mapping):
            raise ApiError(400, f"'{prefix}' must be an object", param=prefix)
        for key, value in given.items():
            param = f"{prefix}.{key}"
            if key not in allowed:
                raise ApiError(400, f"unknown hyperparameter {param!r}; allowed: {', '.join(allowed)}", param=param)
            if key in values and values[key] != value:
                raise ApiError(400, f"{param} = {value!r} contradicts {where[key]} = {values[key]!r}", param=param)
            values[key], where[key] = value, param
    return values, where


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _positive_int(value: Any, param: str) -> int:
    if type(value) is not int or value < 1:
        raise ApiError(400, f"{param} must be a positive integer or 'auto', got {value!r}", param=param)
    return value


def _non_negative_int(value: Any, param: str) -> int:
    if type(value) is not int or value < 0:
        raise ApiError(400, f"{param} must be a non-negative integer, got {value!r}", param=param)
    return value


def _positive_number(value: Any, param: str) -> float:
    if not _is_number(value) or value <= 0:
        raise ApiError(400, f"{param} must be a positive number, got {value!r}", param=param)
    return float(value)


def _non_negative_number(value: Any, param: str) -> float:
    if not _is_number(value) or value < 0:
        raise ApiError(400, f"{param} must be a non-negative number, got {value!r}", param=param)
    return float(value)


def _fraction(value: Any, param: str) -> float:
    if not _is_number(value) or not 0 <= value < 1:
        raise ApiError(400, f"{param} must be a number in [0, 1), got {value!r}", param=param)
    return float(value)


def _targets(value: Any, param: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value)
            or any(v not in SLICE_ORDER for v in value)):
        raise ApiError(400, f"{param} must be a non-empty list of {list(SLICE_ORDER)}, got {value!r}", param=param)
    return tuple(value)


def _suffix(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _SUFFIX.match(value):
        raise ApiError(400, f"'suffix' must be 1-64 characters of letters, digits, '.', '_' or '-', got {value!r}",
                       param="suffix")
    return value


def _metadata(value: Any) -> dict | None:
    if value is None:
        return None
    if (not isinstance(value, Mapping) or len(value) > 16
            or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                       for k, v in value.items())):
        raise ApiError(400, "'metadata' must be an object of at most 16 string keys (<= 64 characters) with "
                       "string values (<= 512 characters)", param="metadata")
    return dict(value)


def _checkpoint_record(job: Job, step: int, loss: float | None) -> dict:
    """The fine_tuning.job.checkpoint object of the version published at `step`."""
    metrics = {"step": float(step)}
    if loss is not None:
        metrics["train_loss"] = loss
    return {
        "id": f"ftckpt-{secrets.token_hex(12)}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": int(time.time()),
        "fine_tuned_model_checkpoint": f"{job.fine_tuned_model}:step-{step}",
        "fine_tuning_job_id": job.id,
        "metrics": metrics,
        "step_number": step,
    }


def _recover_unrecorded_versions(job: Job) -> list[int]:
    """Versions an unfinished job published that its record lacks (the server went down between
    the worker writing step-N and the job's driver recording it): their steps, ascending, now
    recorded as checkpoints, the newest as the published step. A version counts once both PEFT
    files are in its folder (save_peft renames the config in last, so the weights are whole)."""
    found = []
    for path in job.dir.glob("step-*"):
        step = path.name.removeprefix("step-")
        if step.isdigit() and int(step) > job.published_step and (path / "adapter_config.json").exists() \
                and (path / "adapter_model.safetensors").exists():
            found.append(int(step))
    found.sort()
    losses = {e["data"]["step"]: e["data"]["train_loss"] for e in job.events
              if isinstance(e.get("data"), dict) and "train_loss" in e["data"] and "step" in e["data"]}
    for step in found:
        job.checkpoints = [c for c in job.checkpoints if c["step_number"] != step]
        job.checkpoints.append(_checkpoint_record(job, step, losses.get(step)))
    if found:
        job.published_step = found[-1]
    return found
