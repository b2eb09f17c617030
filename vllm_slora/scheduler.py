"""vllm-slora's scheduler, run in the EngineCore process when the plugin is enabled.

`SLoRAScheduler` / `SLoRAAsyncScheduler` subclass vLLM's two schedulers through one
mixin, so the choice between them stays vLLM's (async scheduling on or off). The mixin
owns adapter residency in the unified pool:

* a waiting request is admitted only when its adapter is resident, or has been read by
  the workers (their report says so) and fits now beside the request's prompt KV
  (`_slora_admit`, rules in pool/admission.py); otherwise it waits while requests of
  other adapters go ahead, its adapter is read in the background, and after a bounded
  number of refused steps it holds a reservation so it cannot starve. A request that can
  never fit beside its adapter is refused with the block counts;
* after each schedule, exactly the adapters of running requests stay pinned; the rest
  become a warm, reclaimable cache (see pool/residency.py);
* every step carries an `SLoRAStepPlan` to the workers inside `SLoRASchedulerOutput`,
  and every step's output brings back an `SLoRAWorkerReport` (adapters read, dropped, or
  that could not be loaded: only their requests fail);
* unloads (EngineCore.remove_lora, patches/patch_engine_core.py) free the adapter's
  pages, at once or when its last running request finishes.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from dataclasses import dataclass

from vllm_slora import trace
from vllm_slora.adapters import AdapterError
from vllm_slora.adapters.base_model import BaseModelShape
from vllm_slora.adapters.registry import AdapterRegistry
from vllm_slora.adapters.validation import adapter_files_identity
from vllm_slora.compat import AsyncScheduler, PauseState, Scheduler, SchedulerOutput, logger
from vllm_slora.config import SLoRAConfig
from vllm_slora.patches import apply_patches
from vllm_slora.patches.patch_kv_cache_utils import IDENTITY as ADAPTER_FILES
from vllm_slora.patches.patch_kv_cache_utils import rehash_request
from vllm_slora.pool.admission import MAX_BLOCKED_STEPS, AdmissionGate, Demand, kv_blocks_for, never_fits
from vllm_slora.pool.geometry import page_elems
from vllm_slora.pool.residency import AdapterResidency, Residency
from vllm_slora.pool.training_loan import TrainingLoan, graphs_borrow_pool_blocks
from vllm_slora.step_plan import AdapterPlacement, AdapterSource, SLoRAStepPlan, SLoRAWorkerReport, TrainOrder

# Steps after which an adapter named for a background read with no answer is named again
# (the read is deduplicated by the workers; this only guards against a lost answer).
REWARM_AFTER_STEPS = 256
# Latency observations kept for metrics between two reads of them.
MAX_LATENCY_OBSERVATIONS = 4096
# A step with nothing to run while adapters are being read sleeps this long first: the
# engine loop would otherwise spin empty steps that take CPU and the GIL from the reads
# it waits for (the worker's read thread; the same process with an in-process engine).
IDLE_STEP_SLEEP_S = 0.002


@dataclass
class SLoRASchedulerOutput(SchedulerOutput):
    """vLLM's per-step scheduler output plus the adapter plan (pickled to every rank)."""

    slora: SLoRAStepPlan | None = None


def page_elems_of(kv_cache_config, dtype) -> int:
    """Elements of `dtype` in one block's page of one layer (per TP rank)."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise NotImplementedError(
            f"vllm-slora supports models with one KV cache group; this one has {len(groups)} "
            "(hybrid / sliding-window models are not supported yet)"
        )
    return page_elems(groups[0].kv_cache_spec.page_size_bytes, dtype)


class SLoRASchedulerMixin:
    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        apply_patches("slora_scheduler")
        self.slora_config = SLoRAConfig.from_additional_config(vllm_config.additional_config)
        model_config = vllm_config.model_config
        self.slora_page_elems = page_elems_of(kv_cache_config, model_config.dtype)
        self.slora_tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.slora_registry = AdapterRegistry(
            BaseModelShape.from_hf_config(model_config.hf_config.to_dict()),
            max_lora_rank=vllm_config.lora_config.max_lora_rank,
            page_elems=self.slora_page_elems,
            pool_blocks=kv_cache_config.num_blocks - 1,  # block 0 is vLLM's null block
            tp_size=self.slora_tp_size,
            allow_pickle=self.slora_config.allow_pickle_adapters,
        )
        self.slora_residency = AdapterResidency(
            self.kv_cache_manager.block_pool, on_evict=self._slora_on_evict
        )
        self._slora_specs: dict[int, object] = {}  # lora_int_id -> AdapterSpec
        self._slora_pending_loads: list[AdapterPlacement] = []
        self._slora_pending_evictions: list[int] = []
        self._slora_step = 0
        # lora_int_id -> (version, step) already named in a plan's `warm` list and not
        # answered yet.
        self._slora_warmed: dict[int, tuple[int, int]] = {}
        self._slora_pending_warm: list[AdapterSource] = []
        # (lora_int_id, version) the workers hold read and packed (their reports say so):
        # only these are loaded into pages, so a step never waits on the disk.
        self._slora_host_ready: set[tuple[int, int]] = set()
        # request_id -> why it failed, put into its final output's stop_reason.
        self._slora_errors: dict[str, str] = {}
        self.slora_worker_report: SLoRAWorkerReport | None = None
        # Unloaded adapters whose pages running requests still read.
        self._slora_unloading: set[int] = set()
        self._slora_disk_read_seconds: list[float] = []
        self._slora_pool_copy_seconds: list[float] = []
        # Co-served finetuning (finetune/coserve_planner.py): only with slora.finetune.
        self.slora_training = None
        self.slora_training_loan: TrainingLoan | None = None  # pool/training_loan.py (CPU engines)
        self.slora_published = None  # finetune/published_versions.py
        self._slora_last_schedule: float | None = None
        self._slora_last_period: float | None = None  # wall time of the previous step (training on)
        if self.slora_config.finetune:
            from vllm_slora.finetune.coserve_planner import TrainingPlanner
            from vllm_slora.finetune.published_versions import PublishedVersions

            self.slora_published = PublishedVersions()

            apply_patches("slora_finetune")  # the EngineCore side of patch_shm_broadcast

            self.slora_training = TrainingPlanner(
                self.slora_config.finetune_slack, self.slora_config.finetune_idle_step_ms / 1000.0,
                tp_size=self.slora_tp_size, pp_size=vllm_config.parallel_config.pipeline_parallel_size,
                max_jobs=self.slora_config.finetune_max_jobs,
            )
            if graphs_borrow_pool_blocks():
                group = kv_cache_config.kv_cache_groups[0]
                self.slora_training_loan = TrainingLoan(
                    self.kv_cache_manager.block_pool, group.kv_cache_spec.page_size_bytes * len(group.layer_names))
                self.slora_training.loan = self.slora_training_loan
        trace.record(
            "scheduler_init", cls=type(self).__name__, page_elems=self.slora_page_elems,
            num_blocks=kv_cache_config.num_blocks,
        )

    # -- adapters ----------------------------------------------------------------------
    def _slora_spec(self, lora_request):
        """The validated spec of a request's adapter (registering it on first sight).

        None while the adapter waits to be re-registered: its files were replaced and
        reloaded in place, but running requests still read the old version's pages.
        """
        lora_int_id = lora_request.lora_int_id
        spec = self._slora_specs.get(lora_int_id)
        if spec is not None and lora_request.load_inplace and self._slora_files_replaced(lora_request, spec):
            # vLLM keeps the LoRARequest of a `load_inplace` load and reuses it for every
            # later request, so the flag alone means nothing: new files do.
            if self.slora_residency.state(lora_int_id) is Residency.PINNED:
                return None
            self._slora_drop_copies(lora_int_id)
            spec = None
        if spec is None:
            spec = self.slora_registry.register(lora_request.lora_name, lora_request.lora_path)
            self._slora_specs[lora_int_id] = spec
        return spec

    @staticmethod
    def _slora_files_replaced(lora_request, spec) -> bool:
        files = adapter_files_identity(lora_request.lora_path)
        # Files gone (moved, deleted) do not make a new version: the resident one serves on.
        return files != spec.files and files[0] is not None

    def _slora_drop_copies(self, lora_int_id: int) -> None:
        """Forget an adapter's pages and readiness (its spec is about to be replaced or gone)."""
        if self.slora_residency.state(lora_int_id) is not Residency.ABSENT:
            self.slora_residency.forget(lora_int_id)
            self._slora_pending_evictions.append(lora_int_id)
        spec = self._slora_specs.pop(lora_int_id, None)
        if spec is not None:
            self._slora_host_ready.discard((lora_int_id, spec.version))
            # Requests created from now on hash their KV blocks with the files as they
            # are then, never like KV computed with this version's weights.
            ADAPTER_FILES.forget(spec.name, spec.path)
        self._slora_warmed.pop(lora_int_id, None)

    def _slora_make_resident(self, lora_request) -> bool:
        spec = self._slora_spec(lora_request)
        if spec is None:
            return False
        lora_int_id = lora_request.lora_int_id
        if (self.slora_residency.state(lora_int_id) is Residency.ABSENT
                and (lora_int_id, spec.version) not in self._slora_host_ready):
            self._slora_want_warm(lora_request, spec)
            return False

        def describe(block_ids: tuple[int, ...]) -> AdapterPlacement:
            return AdapterPlacement(
                lora_int_id=lora_int_id,
                lora_name=lora_request.lora_name,
                lora_path=str(spec.path),
                version=spec.version,
                block_ids=block_ids,
                files=spec.files,
            )

        pinned = self.slora_residency.pin(
            lora_int_id,
            spec.blocks_needed(self.slora_page_elems, self.slora_tp_size),
            describe,
        )
        if pinned is None:
            return False
        placement, needs_load = pinned
        if needs_load:
            self._slora_pending_loads.append(placement)
        return True

    def _slora_want_warm(self, lora_request, spec) -> None:
        """Name the adapter for a background read on every worker (once per version)."""
        lora_int_id = lora_request.lora_int_id
        named = self._slora_warmed.get(lora_int_id)
        if named is not None and named[0] == spec.version and self._slora_step - named[1] < REWARM_AFTER_STEPS:
            return
        self._slora_warmed[lora_int_id] = (spec.version, self._slora_step)
        self._slora_pending_warm.append(
            AdapterSource(lora_request.lora_name, str(spec.path), spec.version, lora_int_id, spec.files)
        )

    def _slora_on_evict(self, lora_int_id: int) -> None:
        self._slora_pending_evictions.append(lora_int_id)

    # -- vLLM hooks --------------------------------------------------------------------
    def _handle_blocked_waiting_request(self, request) -> bool:
        if not super()._handle_blocked_waiting_request(request):
            return False
        if not self._slora_admit(request):
            return False
        if self.slora_published and request.lora_request is not None:
            self._slora_note_first_request(request.lora_request.lora_int_id, getattr(request, "slora_arrival_step", None))
        return True

    def add_request(self, request) -> None:
        # The first engine step that could admit it (schedule() numbers the step it builds
        # with _slora_step): a published version's first request is judged against it.
        request.slora_arrival_step = self._slora_step
        super().add_request(request)

    # -- co-served finetuning: newest published version (finetune/published_versions.py) --
    def _slora_follow_published(self, request) -> None:
        """Give a request that has not started yet its job's newest published version (before
        anything sizes, warms or pins its adapter: admission and prefetch)."""
        if not self.slora_published or request.num_computed_tokens or request.num_output_tokens:
            return  # started (or holds KV): it keeps the version it started with
        version = self.slora_published.newest_for(request.lora_request)
        if version is None:
            return
        request.lora_request = version.lora_request
        rehash_request(request)

    def _slora_publish(self, event) -> None:
        """A job's worker published a version in the step that just ended: serve it from now on."""
        job = self.slora_training.jobs.get(event.job_id) if self.slora_training is not None else None
        if job is None:
            return
        data = event.data
        previous = self.slora_published.newest(job.spec.adapter_name)
        version = self.slora_published.publish(
            event.job_id, job.spec.adapter_name, job.spec.job_dir, event.step, data["path"], data.get("updated_at"),
            data.get("updated_step"))
        if previous is not None:
            # Superseded: its pages go back now, or when the last request reading them ends.
            self.slora_unload(previous.lora_request.lora_int_id)
        lora = version.lora_request
        try:
            spec = self._slora_spec(lora)
        except AdapterError as e:  # e.g. the checkpoint cannot be read back: requests say so
            logger.error("vllm-slora: published %s step %d cannot be served: %s", lora.lora_name, event.step, e)
            return
        files = data.get("files")
        if spec is not None and files is not None and tuple(map(_as_tuple, files)) == spec.files:
            # The worker put exactly these files' weights into its host cache while publishing:
            # the next request loads them into pages in its first step, with no disk read.
            self._slora_host_ready.add((lora.lora_int_id, spec.version))
        data["servable_at"] = version.servable_at

    def _slora_note_first_request(self, lora_int_id: int, arrival_step: int | None = None) -> None:
        version = self.slora_published.first_request(lora_int_id, self._slora_step)
        if version is not None and self.slora_training is not None:
            from vllm_slora.step_plan import TrainEvent

            steps = late = None
            if version.updated_step is not None:
                steps = self._slora_step - version.updated_step
                # The first step that could have admitted it with this version: the one right
                # after the update's, or, for a request that arrived later, its own first.
                earliest = max(version.updated_step + 1, arrival_step if arrival_step is not None else 0)
                late = version.first_request_steps_late = self._slora_step - earliest
            self.slora_training.record(TrainEvent(version.job_id, "served", version.step, {
                "first_request_seconds": version.first_request_at - version.updated_at,
                "servable_seconds": version.servable_at - version.updated_at,
                # Engine steps from the one whose units made the update to the one that admitted
                # the first request with it (1: the very next step).
                "first_request_engine_steps": steps,
                # ... beyond the first step that could have admitted it (0: none was lost).
                "first_request_steps_late": late,
            }))

    # -- admission under pool pressure (rules in pool/admission.py) ----------------------
    def _slora_admit(self, request) -> bool:
        """Whether vLLM may go on to allocate KV blocks for a waiting request now.

        Refuses a request that can never fit beside its adapter; pins (loads) an adapter
        only when its request's KV blocks fit too; while an aged request holds the
        reservation, admits others only if they fit beside it.
        """
        gate = self._slora_admit_gate()
        self._slora_follow_published(request)
        if request.num_computed_tokens > 0:
            # Already holds KV blocks (e.g. an async KV load): not ours to hold back.
            return self._slora_admit_pin(request)
        try:
            demand = self._slora_admit_demand(request, check_fit=True)
        except AdapterError as e:
            return self._slora_admit_refuse(request, e)
        if demand is None:  # its adapter waits to be re-registered (see _slora_spec)
            gate.blocked(request.request_id, (request.arrival_time, request.request_id), request)
            return False
        beside = None
        holder = gate.holder(self._slora_admit_is_waiting)
        if holder is not None and holder[0] != request.request_id:
            self._slora_follow_published(holder[1])
            try:
                beside = self._slora_admit_demand(holder[1])
            except AdapterError:
                gate.forget(holder[0])  # refused when it is considered itself
        if beside is not None or demand.adapter_blocks:
            pool = self.kv_cache_manager.block_pool
            free = pool.get_num_free_blocks() - (self.kv_cache_manager.watermark_blocks if self.running else 0)
            if not demand.fits(free, beside):
                gate.blocked(request.request_id, (request.arrival_time, request.request_id), request)
                return False
        if not self._slora_admit_pin(request):
            return False  # not the pool's fault (it had room): the adapter is not ready or bad
        gate.admitted(request.request_id)
        return True

    def _slora_admit_gate(self) -> AdmissionGate:
        gate = getattr(self, "_slora_gate", None)
        if gate is None:
            steps = getattr(self.slora_config, "max_blocked_steps", MAX_BLOCKED_STEPS)
            gate = self._slora_gate = AdmissionGate(steps)
        return gate

    def _slora_admit_demand(self, request, check_fit: bool = False) -> Demand | None:
        """Free blocks `request` takes if admitted now (None while its adapter cannot be
        registered yet). Raises AdapterError for a bad adapter and, with `check_fit`, for
        a request that can never fit in the pool."""
        lora = request.lora_request
        kv_blocks = kv_blocks_for(request.num_tokens, self.block_size)
        if lora is None:
            return Demand(None, 0, kv_blocks)
        spec = self._slora_spec(lora)
        if spec is None:
            return None
        cache = getattr(self, "_slora_admit_blocks", None)
        if cache is None:
            cache = self._slora_admit_blocks = {}
        key = (lora.lora_int_id, spec.version)
        blocks = cache.get(key)
        if blocks is None:
            blocks = cache[key] = spec.blocks_needed(self.slora_page_elems, self.slora_tp_size)
            if len(cache) > 4096:
                cache.clear()
        if check_fit:
            usable = self.kv_cache_manager.block_pool.num_gpu_blocks - 1  # block 0 is the null block
            problem = never_fits(blocks, request.num_tokens, self.block_size, usable)
            if problem is not None:
                raise AdapterError(lora.lora_name, problem)
        if self.slora_residency.state(lora.lora_int_id) is Residency.PINNED:
            blocks = 0
        return Demand(lora.lora_int_id, blocks, kv_blocks)

    def _slora_admit_is_waiting(self, request) -> bool:
        status = request.status
        return (
            self.requests.get(request.request_id) is request
            and not request.is_finished()
            and status is not type(status).RUNNING
        )

    def _slora_admit_pin(self, request) -> bool:
        """Make the request's adapter resident and pinned; False if it cannot be now
        (e.g. not read from disk yet) or the adapter is bad (then the request is refused)."""
        lora = request.lora_request
        if lora is None:
            return True
        try:
            return self._slora_make_resident(lora)
        except AdapterError as e:
            return self._slora_admit_refuse(request, e)

    def _slora_admit_refuse(self, request, error: Exception) -> bool:
        # Finished with FINISHED_ERROR (the message in stop_reason) in the next
        # update_from_output; the engine keeps serving everyone else.
        logger.error("vllm-slora: request %s rejected: %s", request.request_id, error)
        self._slora_reject(request, str(error))
        self._slora_admit_gate().forget(request.request_id)
        return False

    def _slora_training_paused(self) -> bool:
        # pause_generation (e.g. to swap weights): training stops too, so it never reads
        # weights being replaced, and a completed pause leaves the engine with no work.
        return self.pause_state is not PauseState.UNPAUSED

    def has_requests(self) -> bool:
        # A co-served finetuning job keeps the engine stepping with no request at all.
        return super().has_requests() or (
            self.slora_training is not None and self.slora_training.busy() and not self._slora_training_paused()
        ) or (  # one more step to call a loan back once the last job is gone (never while paused)
            self.slora_training_loan is not None and bool(self.slora_training_loan.blocks)
            and not self._slora_training_paused()
        )

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        train = None
        if self.slora_training is not None and self._slora_training_paused():
            self._slora_last_schedule = None  # no period spans a pause
        elif self.slora_training is not None:
            now = time.perf_counter()
            self._slora_last_period = None
            if self._slora_last_schedule is not None:
                self._slora_last_period = now - self._slora_last_schedule
                self.slora_training.observe_period(self._slora_last_period)
            self._slora_last_schedule = now
            train = self.slora_training.order(len(self.running), len(self.waiting), output.total_num_scheduled_tokens,
                                              prefill=self._slora_computes_prompt(output))
            train = self._slora_lend_for_training(train)
            if train is not None:
                train.engine_step = self._slora_step
        if not output.total_num_scheduled_tokens and self._slora_warmed and train is None:
            time.sleep(IDLE_STEP_SLEEP_S)
        in_use = {r.lora_request.lora_int_id for r in self.running if r.lora_request}
        self.slora_residency.retain_only(in_use)
        for lora_int_id in [i for i in self._slora_unloading if i not in in_use]:
            self._slora_unloading.discard(lora_int_id)
            self.slora_unload(lora_int_id)
        self._slora_prefetch()
        plan = SLoRAStepPlan(
            load=self._slora_pending_loads,
            evicted=self._slora_pending_evictions,
            warm=self._slora_pending_warm,
            train=train,
        )
        self._slora_pending_loads, self._slora_pending_evictions, self._slora_pending_warm = [], [], []
        self._slora_step += 1
        self._slora_trace_step(output, plan)
        fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output) if f.init}
        return SLoRASchedulerOutput(**fields, slora=plan)

    def _slora_computes_prompt(self, output) -> bool:
        """Does this step compute prompt tokens (a prefill chunk, or a preempted request's
        recompute)? schedule() has already advanced num_computed_tokens by the scheduled count,
        so a request had prompt left when, before this step, more than its last token was
        uncomputed (a decode computes exactly the last one; speculative tokens are not counted
        in num_tokens)."""
        for req_id, count in output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is not None and request.num_computed_tokens - count < request.num_tokens - 1:
                return True
        return False

    def _slora_lend_for_training(self, order):
        """Lend pool blocks to the jobs' layer graphs while the KV cache can spare them, and call
        them back under KV pressure or when no job is left (pool/training_loan.py). Runs after
        this step's KV allocation; the order tells the workers in this very step."""
        loan = self.slora_training_loan
        if loan is None:
            return order
        if loan.blocks and (order is None or loan.under_pressure()):
            loan.recall()
            if order is None:  # no job left: the workers only free what the graphs held
                order = TrainOrder()
        elif order is not None and not self.waiting:
            wanted = min(self.slora_training.graph_bytes_wanted, self.slora_config.finetune_activation_mb << 20)
            lent = loan.try_lend(wanted, self.slora_training.graph_layer_bytes, partial=not self.running)
            if lent:
                order.lent_blocks = lent
        if order is not None:
            order.graph_bytes = loan.nbytes
        return order

    def _slora_prefetch(self) -> None:
        """Get adapters of requests at the head of the queue ready ahead of time.

        Every such adapter not resident is named to the workers for a background read
        (disk -> host, once per adapter version); one already read is also made
        resident now while the pool has room to spare, unpinned (cached), so the KV
        cache can still take the blocks back.
        """
        depth = self.slora_config.prefetch_depth
        if not depth:
            return
        pool = self.kv_cache_manager.block_pool
        spare = pool.num_gpu_blocks // 4
        room = True
        for request in itertools.islice(self.waiting, depth):
            self._slora_follow_published(request)  # never warm a version superseded while it waited
            lora = request.lora_request
            if lora is None:
                continue
            if self.slora_residency.state(lora.lora_int_id) is not Residency.ABSENT:
                continue
            try:
                spec = self._slora_spec(lora)
            except AdapterError:
                continue  # reported when the request is considered for admission
            if spec is None:
                continue
            if (lora.lora_int_id, spec.version) not in self._slora_host_ready:
                self._slora_want_warm(lora, spec)
                continue
            needed = spec.blocks_needed(self.slora_page_elems, self.slora_tp_size)
            room = room and pool.get_num_free_blocks() - needed >= spare
            if room and self._slora_make_resident(lora):
                self.slora_residency.unpin(lora.lora_int_id)

    # -- what the workers report -------------------------------------------------------
    def update_from_output(self, scheduler_output, model_runner_output):
        report = getattr(model_runner_output, "slora_report", None)
        failed: dict[str, str] = {}
        if report is not None:
            failed = self._slora_take_report(report)
            if failed:
                model_runner_output = _without_tokens(model_runner_output, failed)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self._slora_errors:
            self._slora_put_errors(outputs)
        return outputs

    def _slora_take_report(self, report: SLoRAWorkerReport) -> dict[str, str]:
        """Apply a worker report; returns request_id -> error of the requests it fails."""
        self.slora_worker_report = report
        if self.slora_training is not None:
            for event in report.training or ():
                if event.kind == "published":
                    self._slora_publish(event)
            self.slora_training.take(report)
        for observed, kept in ((report.disk_read_seconds, self._slora_disk_read_seconds),
                               (report.pool_copy_seconds, self._slora_pool_copy_seconds)):
            kept.extend(observed)
            del kept[:-MAX_LATENCY_OBSERVATIONS]
        for lora_int_id, version in report.ready:
            spec = self._slora_specs.get(lora_int_id)
            if spec is not None and spec.version == version:
                self._slora_host_ready.add((lora_int_id, version))
                self._slora_warmed.pop(lora_int_id, None)
        for lora_int_id, version in report.dropped:
            # Named again at its next admission attempt (a cached copy answers at once).
            self._slora_host_ready.discard((lora_int_id, version))
            if self._slora_warmed.get(lora_int_id, (None,))[0] == version:
                del self._slora_warmed[lora_int_id]
        failed: dict[str, str] = {}
        for lora_int_id, version, message in report.failed:
            spec = self._slora_specs.get(lora_int_id)
            if spec is None or spec.version != version:
                continue  # about a version already replaced or unloaded
            failed.update(self._slora_fail_adapter(lora_int_id, message))
        return failed

    def _slora_fail_adapter(self, lora_int_id: int, message: str) -> dict[str, str]:
        """Fail every request of an adapter that the workers could not load.

        The adapter is forgotten (pages back to the pool, spec dropped): a later request
        registers it again from its files. Nothing else is touched.
        """
        self._slora_drop_copies(lora_int_id)
        victims = [r for r in self.requests.values()
                   if r.lora_request is not None and r.lora_request.lora_int_id == lora_int_id
                   and not r.is_finished()]
        for request in victims:
            self._slora_reject(request, message)
        logger.error("vllm-slora: %s; failed %d request(s) of it, the engine serves on", message, len(victims))
        return {r.request_id: message for r in victims}

    def _slora_reject(self, request, message: str) -> None:
        """Finish a request with an error naming the problem (in the next update)."""
        self._slora_errors[request.request_id] = message
        self.grammar_compile_error_reqs.add(request.request_id)

    def _slora_put_errors(self, outputs) -> None:
        # vLLM finishes rejected requests with FinishReason.ERROR and no text; the reason
        # travels in stop_reason (LLM users see it on the output, the server logs it).
        for engine_outputs in outputs.values():
            for output in engine_outputs.outputs:
                message = self._slora_errors.pop(output.request_id, None)
                if message is not None:
                    output.stop_reason = message
        # Requests aborted before they could be failed leave nothing behind.
        for request_id in [r for r in self._slora_errors if r not in self.requests]:
            del self._slora_errors[request_id]

    def slora_latency_observations(self) -> tuple[list[float], list[float]]:
        """(disk -> host, host -> pool) load seconds observed since the previous call."""
        taken = self._slora_disk_read_seconds, self._slora_pool_copy_seconds
        self._slora_disk_read_seconds, self._slora_pool_copy_seconds = [], []
        return taken

    # -- operator actions --------------------------------------------------------------
    def slora_finetune(self, action: str, payload: dict) -> dict:
        """Co-served finetuning control (EngineCore utility `slora_finetune`, see the planner)."""
        if self.slora_training is None:
            from vllm_slora.finetune.coserve_planner import TrainingRefused

            raise TrainingRefused("this engine does not co-serve finetuning: start it with slora.finetune=true "
                                  "(--additional-config '{\"slora\": {\"finetune\": true}}')")
        if action == "versions":  # what each job's name serves now (finetune/published_versions.py)
            return {"versions": self.slora_published.describe()}
        return self.slora_training.handle(action, payload)

    def slora_watch_arrivals(self, input_queue) -> None:
        """Count new requests through the EngineCore's input queue for training steps to see
        (finetune/arrivals.py); once per engine, from the first finetune utility call."""
        if self.slora_training is None or self.slora_training.arrivals is not None:
            return
        from vllm_slora.compat import EngineCoreRequestType
        from vllm_slora.finetune.arrivals import ArrivalCounter, count_arrivals

        counter = ArrivalCounter.create()
        count_arrivals(input_queue, counter, lambda item: item[0] == EngineCoreRequestType.ADD)
        self.slora_training.arrivals = counter.path

    def slora_unload(self, lora_int_id: int) -> bool:
        """The adapter was unloaded: free its pages now (or, while running requests read
        them, when the last one finishes) and forget its spec. Later requests for the
        name are refused by the API server (404); a new load registers it afresh."""
        spec = self._slora_specs.get(lora_int_id)
        if spec is None:
            return False
        if any(r.lora_request is not None and r.lora_request.lora_int_id == lora_int_id for r in self.running):
            self._slora_unloading.add(lora_int_id)
            return True
        self._slora_drop_copies(lora_int_id)
        if self.slora_registry.get(spec.name) is spec:  # not since registered anew
            self.slora_registry.unregister(spec.name)
        return True

    def _slora_trace_step(self, output, plan: SLoRAStepPlan) -> None:
        if not trace.enabled():
            return
        scheduled = [r.lora_request.lora_int_id for r in self.running if r.lora_request
                     and r.request_id in output.num_scheduled_tokens]
        stats = self.slora_residency.stats()
        training = {} if plan.train is None else {"train_budget_s": plan.train.budget_s, "train_idle": plan.train.idle,
                                                  "previous_period_s": self._slora_last_period}
        trace.record(
            "step", step=self._slora_step, scheduled_adapters=len(set(scheduled)),
            step_loads=len(plan.load), step_evictions=len(plan.evicted), step_warm=len(plan.warm),
            new_requests=len(output.scheduled_new_reqs), scheduled_tokens=output.total_num_scheduled_tokens,
            **dataclasses.asdict(stats),
            kv_blocks=stats.kv_blocks, **training,
        )

    def reset_prefix_cache(self, *args, **kwargs) -> bool:
        # vLLM's reset needs every block free; cached adapters count as free but their
        # watchers would fire, so forget them first. Pinned ones belong to running
        # requests and make the reset fail exactly as those requests' KV blocks do.
        self.slora_residency.drop_all_cached()
        return super().reset_prefix_cache(*args, **kwargs)

    # -- metrics (vllm_slora/metrics.py; served on /metrics by patches/patch_loggers.py) --
    def make_stats(self, *args, **kwargs):
        from vllm_slora import metrics

        return metrics.attach(self, super().make_stats(*args, **kwargs))

    def _free_request(self, request, *args, **kwargs):
        from vllm_slora import metrics

        metrics.request_finished(self, request)
        return super()._free_request(request, *args, **kwargs)


def _as_tuple(item):
    """A files identity entry as the registry makes it (events may carry lists)."""
    return tuple(item) if isinstance(item, list) else item


def _without_tokens(model_runner_output, request_ids):
    """A copy of the output with no sampled tokens for ``request_ids`` (failed requests)."""
    output = copy.copy(model_runner_output)
    output.sampled_token_ids = list(output.sampled_token_ids)
    for request_id in request_ids:
        index = output.req_id_to_index.get(request_id)
        if index is not None and index < len(output.sampled_token_ids):
            output.sampled_token_ids[index] = []
    return output


class SLoRAScheduler(SLoRASchedulerMixin, Scheduler):
    pass


class SLoRAAsyncScheduler(SLoRASchedulerMixin, AsyncScheduler):
    pass
