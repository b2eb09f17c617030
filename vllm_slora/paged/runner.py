"""The model-runner hook: vLLM's runner with stock LoRA replaced by unified paging.

The worker swaps its runner's class for ``(SLoRARunnerMixin, <the runner's class>)``
right after creating it (`install_runner_mixin`), which covers the CPU, V1 and V2 GPU
runners alike and also the paths that call the runner directly (legacy Ray DAG). The
mixin takes over every method of vLLM's `LoRAModelRunnerMixin`, so vLLM's
`LRUCacheWorkerLoRAManager` and its fixed `max_loras x max_rank` slot tensors are never
created, and reads each step's `SLoRAStepPlan` before the forward.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from functools import cache

import numpy as np

from vllm_slora import trace
from vllm_slora.adapters import BaseModelShape
from vllm_slora.compat import attach_report, logger, worker_lora_internals
from vllm_slora.config import SLoRAConfig
from vllm_slora.pool.geometry import page_elems

from .layers import install_paged_layers
from .lent_pages import release_pages
from .manager import PagedAdapterManager
from .modules import PAGED_MODULES
from .pool_views import flat_pool_views


class SLoRARunnerMixin:
    slora: PagedAdapterManager | None

    def _slora_setup(self, slora_config: SLoRAConfig) -> None:
        self.slora_config = slora_config
        self.slora = None  # built in load_lora_model, once the model exists

    # -- model and pool ------------------------------------------------------------------
    def load_lora_model(self, model, vllm_config, device):
        supports_lora, linear_types, tp_group_fn = worker_lora_internals()
        if not supports_lora(model):
            raise ValueError(f"{model.__class__.__name__} does not support LoRA yet.")
        tp = tp_group_fn()
        model_config = vllm_config.model_config
        base = BaseModelShape.from_hf_config(model_config.hf_config.to_dict(), dtype=model_config.dtype)
        self.slora = PagedAdapterManager(
            base, model_config.dtype, device, self.slora_config.host_cache_mb << 20,
            tp_size=tp.size, tp_rank=tp.rank, max_lora_rank=vllm_config.lora_config.max_lora_rank,
            allow_pickle=self.slora_config.allow_pickle_adapters,
            max_num_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
            max_adapters_per_step=vllm_config.lora_config.max_loras,
            kernel_backend=self.slora_config.kernel_backend,
            gather_objects=tp.all_gather_object,
        )
        # vLLM code checks `hasattr(runner, "lora_manager")` to mean "LoRA is enabled".
        self.lora_manager = self.slora
        installed = install_paged_layers(model, self.slora.state, self.slora.backend, base, linear_types, tp)
        expected = len(PAGED_MODULES) * base.num_layers
        if len(installed) != expected:
            raise NotImplementedError(
                f"vllm-slora found {len(installed)} of the {expected} qkv/o/gate_up/down projections "
                f"in {model.__class__.__name__}; only Llama-style decoders are supported"
            )
        trace.record("paged_layers", count=len(installed), backend=self.slora.backend.name)
        if self.slora.backend.name == "torch" and self.slora_config.kernel_backend == "auto":
            from vllm_slora.paged.ops import cpu_native

            logger.warning("vllm-slora: %s; LoRA runs on the slower torch path", cpu_native.unavailable_reason())
        return model

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        if self.slora is None:
            return
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise NotImplementedError(f"vllm-slora supports one KV cache group, this model has {len(groups)}")
        page_bytes = groups[0].kv_cache_spec.page_size_bytes
        pools = flat_pool_views(self.kv_caches, kv_cache_config.num_blocks, page_bytes, self.slora.dtype)
        self.slora.attach_pool(pools, page_elems(page_bytes, self.slora.dtype))
        trace.record("pool_attached", layers=len(pools), num_blocks=kv_cache_config.num_blocks,
                     page_elems=self.slora.page_elems)

    def reset_lora_state(self) -> None:
        # Called after base weights are reloaded; adapter pages do not depend on them.
        pass

    # -- per step ------------------------------------------------------------------------
    def execute_model(self, scheduler_output, *args, **kwargs):
        plan = getattr(scheduler_output, "slora", None)
        self._slora_step_started = time.perf_counter()
        self._slora_train_order = plan.train if plan is not None else None
        if plan is not None and self.slora is not None:
            # Pages are filled before the forward that reads them: same stream on GPU.
            self.slora.apply_plan(plan)
            if plan.train is not None:
                self._slora_training_memory(plan.train)
        return self._slora_with_report(super().execute_model(scheduler_output, *args, **kwargs))

    def sample_tokens(self, *args, **kwargs):
        return self._slora_with_report(super().sample_tokens(*args, **kwargs))

    def _slora_with_report(self, output):
        """The step's output carrying this worker's SLoRAWorkerReport (see step_plan.py).

        The scheduler reads it in update_from_output; only the output rank's reaches it.
        Co-served training units run here, after the step's inference is complete.
        """
        if self.slora is None or output is None:
            return output
        inference_seconds = time.perf_counter() - getattr(self, "_slora_step_started", time.perf_counter())
        order, self._slora_train_order = getattr(self, "_slora_train_order", None), None
        training = None
        if order is not None:
            training = self._slora_training()
            with self._slora_training_threads(order):
                spent, units = training.step(order)
        else:
            spent, units = 0.0, 0

        def take_report():
            report = self.slora.take_report()
            report.inference_seconds = inference_seconds
            if training is not None:
                report.training = training.take_events()
                report.train_seconds, report.train_units = spent, units
                report.train_cut_short = training.cut_short
                report.next_unit_seconds = training.next_unit_seconds()
                report.train_graph_bytes_wanted = training.graph_bytes_wanted()
                report.train_graph_layer_bytes = training.graph_layer_bytes()
            return report

        return attach_report(output, take_report)

    def _slora_training_memory(self, order) -> None:
        """Before the forward: pages newly lent to training give their RAM back (CPU), and a
        recalled loan's graphs are dropped before KV can be written into those pages."""
        if order.lent_blocks and self.slora.state.pools:
            page_bytes = self.slora.page_elems * self.slora.dtype.itemsize
            released = release_pages(self.slora.state.pools, order.lent_blocks, page_bytes)
            trace.record("training_loan", blocks=len(order.lent_blocks), released_bytes=released)
        self._slora_training().set_graph_budget(order.graph_bytes)

    def _slora_training_threads(self, order):
        """An idle step trains with the OpenMP threads unpinned; pinned again before the next
        step's inference (finetune/thread_affinity.py)."""
        from vllm_slora.finetune.thread_affinity import PinnedThreads, idle_unpin_enabled

        if not order.idle or not idle_unpin_enabled():
            return nullcontext()
        threads = getattr(self, "_slora_pinned_threads", None)
        if threads is None:  # vLLM pinned them at worker start: found once
            threads = self._slora_pinned_threads = PinnedThreads()
            trace.record("idle_unpin", cores=sorted(threads.cores), home=sorted(threads.home), active=threads.active)
        return threads.unpinned()

    def _slora_training(self):
        trainer = getattr(self, "slora_trainer", None)
        if trainer is None:
            from vllm_slora.finetune.coserve_worker import WorkerTraining

            trainer = WorkerTraining(self.model, base_model=self.model_config.model,
                                     activation_budget_bytes=self.slora_config.finetune_activation_mb << 20)
            trainer.host_cache = self.slora.host_cache
            self.slora_trainer = trainer
        return trainer

    def set_active_loras(self, input_batch, num_scheduled_tokens, num_sampled_tokens=None, mapping_type=None):
        # Same mapping as vLLM's make_lora_inputs, without building Python tuples of
        # every token's id (a visible cost for long prefills on CPU).
        self._ensure_lora_enabled()
        per_request = input_batch.request_lora_mapping[: input_batch.num_reqs]  # lora_int_id, 0 = none
        self.slora.set_token_mapping(np.repeat(per_request, num_scheduled_tokens))

    def _set_active_loras(self, prompt_lora_mapping, token_lora_mapping, lora_requests, mapping_type=None) -> None:
        # Entry point of the V2 runner and of dummy runs.
        self._ensure_lora_enabled()
        self.slora.set_token_mapping(token_lora_mapping)

    def _ensure_lora_enabled(self) -> None:
        if getattr(self, "slora", None) is None:
            raise RuntimeError("LoRA is not enabled. Use --enable-lora to enable LoRA.")

    # -- profile / warm-up / capture: no token has an adapter --------------------------------
    # The paged layers still call their op (the op decides there is nothing to do), so
    # a graph traced or captured here runs the LoRA kernels in every later step, reading
    # the same static metadata tensors (step_metadata.py).
    @contextmanager
    def maybe_setup_dummy_loras(self, lora_config, remove_lora: bool = True):
        yield

    @contextmanager
    def maybe_select_dummy_loras(self, lora_config, num_scheduled_tokens, *args, **kwargs):
        if self.slora is not None:
            self.slora.clear_step()
        yield

    @contextmanager
    def maybe_dummy_run_with_lora(self, lora_config, num_scheduled_tokens, *args, **kwargs):
        if self.slora is not None:
            self.slora.clear_step()
        yield

    def maybe_remove_all_loras(self, lora_config) -> None:
        if self.slora is not None:
            self.slora.clear_step()

    # -- engine RPCs -----------------------------------------------------------------------
    def add_lora(self, lora_request) -> bool:
        self._ensure_lora_enabled()
        return self.slora.add_adapter(
            lora_request.lora_int_id, lora_request.lora_name, lora_request.lora_path,
            load_inplace=lora_request.load_inplace,
        )

    def remove_lora(self, lora_id: int) -> bool:
        self._ensure_lora_enabled()
        return self.slora.remove_adapter(lora_id)

    def pin_lora(self, lora_id: int) -> bool:
        self._ensure_lora_enabled()
        return self.slora.pin_adapter(lora_id)

    def list_loras(self) -> set[int]:
        self._ensure_lora_enabled()
        return self.slora.list_adapters()


@cache
def runner_class_with_slora(runner_cls: type) -> type:
    """``(SLoRARunnerMixin, runner_cls)``, one class per runner class."""
    return type(f"SLoRA{runner_cls.__name__}", (SLoRARunnerMixin, runner_cls), {})


def install_runner_mixin(runner, slora_config: SLoRAConfig) -> None:
    """Give an existing model runner the S-LoRA behaviour (before load_model runs)."""
    if not isinstance(runner, SLoRARunnerMixin):
        runner.__class__ = runner_class_with_slora(type(runner))
    runner._slora_setup(slora_config)
