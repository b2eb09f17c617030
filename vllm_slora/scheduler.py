"""vllm-slora's scheduler, run in the EngineCore process when the plugin is enabled.

`SLoRAScheduler` / `SLoRAAsyncScheduler` subclass vLLM's two schedulers through one
mixin, so the choice between them stays vLLM's (async scheduling on or off). The mixin
owns adapter residency in the unified pool:

* a waiting request is admitted only when its adapter is resident or can be made
  resident now (`_handle_blocked_waiting_request`); otherwise it waits while requests
  of other adapters go ahead;
* after each schedule, exactly the adapters of running requests stay pinned; the rest
  become a warm, reclaimable cache (see pool/residency.py);
* every step carries an `SLoRAStepPlan` to the workers inside `SLoRASchedulerOutput`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vllm_slora import trace
from vllm_slora.adapters import AdapterError
from vllm_slora.adapters.base_model import BaseModelShape
from vllm_slora.adapters.registry import AdapterRegistry
from vllm_slora.compat import AsyncScheduler, Scheduler, SchedulerOutput, logger
from vllm_slora.config import SLoRAConfig
from vllm_slora.patches import apply_patches
from vllm_slora.pool.geometry import page_elems
from vllm_slora.pool.residency import AdapterResidency, Residency
from vllm_slora.step_plan import AdapterPlacement, AdapterSource, SLoRAStepPlan


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
        # lora_int_id -> version already named in a plan's `warm` list and not loaded into
        # pages since (named again once it has been loaded and may have left the host cache).
        self._slora_warmed: dict[int, int] = {}
        trace.record(
            "scheduler_init", cls=type(self).__name__, page_elems=self.slora_page_elems,
            num_blocks=kv_cache_config.num_blocks,
        )

    # -- adapters ----------------------------------------------------------------------
    def _slora_spec(self, lora_request):
        """The validated spec of a request's adapter (registering it on first sight)."""
        spec = self._slora_specs.get(lora_request.lora_int_id)
        if spec is not None and not lora_request.load_inplace:
            return spec
        spec = self.slora_registry.register(lora_request.lora_name, lora_request.lora_path)
        if lora_request.lora_int_id in self._slora_specs:
            # Re-registered in place: the old pages hold the old version's weights.
            self.slora_residency.forget(lora_request.lora_int_id)
        self._slora_specs[lora_request.lora_int_id] = spec
        return spec

    def _slora_make_resident(self, lora_request) -> bool:
        spec = self._slora_spec(lora_request)

        def describe(block_ids: tuple[int, ...]) -> AdapterPlacement:
            return AdapterPlacement(
                lora_int_id=lora_request.lora_int_id,
                lora_name=lora_request.lora_name,
                lora_path=str(spec.path),
                version=spec.version,
                block_ids=block_ids,
            )

        pinned = self.slora_residency.pin(
            lora_request.lora_int_id,
            spec.blocks_needed(self.slora_page_elems, self.slora_tp_size),
            describe,
        )
        if pinned is None:
            return False
        placement, needs_load = pinned
        if needs_load:
            self._slora_pending_loads.append(placement)
            self._slora_warmed.pop(lora_request.lora_int_id, None)
        return True

    def _slora_on_evict(self, lora_int_id: int) -> None:
        self._slora_pending_evictions.append(lora_int_id)

    # -- vLLM hooks --------------------------------------------------------------------
    def _handle_blocked_waiting_request(self, request) -> bool:
        if not super()._handle_blocked_waiting_request(request):
            return False
        lora = request.lora_request
        if lora is None:
            return True
        try:
            return self._slora_make_resident(lora)
        except AdapterError as e:
            # vLLM finishes requests listed here with FINISHED_ERROR in the next
            # update_from_output; the engine keeps serving everyone else.
            logger.error("vllm-slora: request %s rejected: %s", request.request_id, e)
            self.grammar_compile_error_reqs.add(request.request_id)
            return False

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        in_use = {r.lora_request.lora_int_id for r in self.running if r.lora_request}
        self.slora_residency.retain_only(in_use)
        warm = self._slora_prefetch()
        plan = SLoRAStepPlan(
            load=self._slora_pending_loads,
            evicted=self._slora_pending_evictions,
            warm=warm,
        )
        self._slora_pending_loads, self._slora_pending_evictions = [], []
        self._slora_step += 1
        self._slora_trace_step(output, plan)
        fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output) if f.init}
        return SLoRASchedulerOutput(**fields, slora=plan)

    def _slora_prefetch(self) -> list[AdapterSource]:
        """Get adapters of requests at the head of the queue ready ahead of time.

        Every such adapter not resident is named to the workers (`warm`: disk -> host in
        the background, once per adapter version); while the pool has room to spare it
        is also made resident now, unpinned (cached), so the KV cache can still take the
        blocks back.
        """
        depth = self.slora_config.prefetch_depth
        if not depth:
            return []
        pool = self.kv_cache_manager.block_pool
        spare = pool.num_gpu_blocks // 4
        warm: list[AdapterSource] = []
        room = True
        for request in list(self.waiting)[:depth]:
            lora = request.lora_request
            if lora is None:
                continue
            if self.slora_residency.state(lora.lora_int_id) is not Residency.ABSENT:
                continue
            try:
                spec = self._slora_spec(lora)
            except AdapterError:
                continue  # reported when the request is considered for admission
            if self._slora_warmed.get(lora.lora_int_id) != spec.version:
                self._slora_warmed[lora.lora_int_id] = spec.version
                warm.append(AdapterSource(lora.lora_name, str(spec.path), spec.version))
            needed = spec.blocks_needed(self.slora_page_elems, self.slora_tp_size)
            room = room and pool.get_num_free_blocks() - needed >= spare
            if room and self._slora_make_resident(lora):
                self.slora_residency.unpin(lora.lora_int_id)
        return warm

    def _slora_trace_step(self, output, plan: SLoRAStepPlan) -> None:
        if not trace.enabled():
            return
        scheduled = [r.lora_request.lora_int_id for r in self.running if r.lora_request
                     and r.request_id in output.num_scheduled_tokens]
        stats = self.slora_residency.stats()
        trace.record(
            "step", step=self._slora_step, scheduled_adapters=len(set(scheduled)),
            step_loads=len(plan.load), step_evictions=len(plan.evicted), step_warm=len(plan.warm),
            **dataclasses.asdict(stats),
            kv_blocks=stats.kv_blocks,
        )

    def reset_prefix_cache(self, *args, **kwargs) -> bool:
        # vLLM's reset needs every block free; cached adapters count as free but their
        # watchers would fire, so forget them first. Pinned ones belong to running
        # requests and make the reset fail exactly as those requests' KV blocks do.
        self.slora_residency.drop_all_cached()
        return super().reset_prefix_cache(*args, **kwargs)


class SLoRAScheduler(SLoRASchedulerMixin, Scheduler):
    pass


class SLoRAAsyncScheduler(SLoRASchedulerMixin, AsyncScheduler):
    pass
