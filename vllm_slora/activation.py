"""Turn a stock VllmConfig into a vllm-slora one when `additional_config` asks for it."""

from __future__ import annotations

import os

from vllm_slora import trace
from vllm_slora.config import SLoRAConfig, SLoRAConfigError

SCHEDULER = "vllm_slora.scheduler.SLoRAScheduler"
ASYNC_SCHEDULER = "vllm_slora.scheduler.SLoRAAsyncScheduler"
CPU_WORKER = "vllm_slora.worker.SLoRACPUWorker"
GPU_WORKER = "vllm_slora.worker.SLoRAGPUWorker"


def activate_if_requested(vllm_config, requested_compile_mode=None) -> SLoRAConfig | None:
    """Swap in vllm-slora's scheduler and worker classes if the `slora` key is present.

    ``requested_compile_mode`` is the compilation mode the user asked for (None: vLLM's
    default), so that an explicit choice is never overridden.

    Raises SLoRAConfigError (a ValueError) naming the problem when the section is
    invalid or the engine's other settings cannot work with it.
    """
    slora = SLoRAConfig.from_additional_config(vllm_config.additional_config)
    if slora is None:
        return None

    from vllm_slora.compat import STOCK_CPU_WORKER, STOCK_GPU_WORKER, check_vllm_version

    check_vllm_version()
    if vllm_config.lora_config is None:
        raise SLoRAConfigError(
            "additional_config['slora'] needs LoRA enabled: add --enable-lora "
            "(LLM(..., enable_lora=True)) and --max-lora-rank for the largest adapter"
        )

    parallel = vllm_config.parallel_config
    _check_adapter_dirs(slora, parallel)
    workers = {STOCK_CPU_WORKER: CPU_WORKER, STOCK_GPU_WORKER: GPU_WORKER}
    if parallel.worker_cls in workers:
        parallel.worker_cls = workers[parallel.worker_cls]
    elif parallel.worker_cls not in workers.values():
        raise SLoRAConfigError(
            f"vllm-slora cannot run with worker class {parallel.worker_cls!r}; supported: "
            f"the platform default ({STOCK_CPU_WORKER} or {STOCK_GPU_WORKER})"
        )

    # --max-loras keeps its stock meaning (distinct adapters per batch) only when the
    # user sets it. vLLM's default of 1 would serialize adapters, and with no fixed
    # slots there is nothing else it needs to bound. (An explicit --max-loras 1 is
    # indistinguishable from the default; use 2 or more to cap.)
    lora = vllm_config.lora_config
    if lora.max_loras == 1:
        lora.max_loras = vllm_config.scheduler_config.max_num_seqs

    sched = vllm_config.scheduler_config
    if sched.scheduler_cls not in (None, SCHEDULER, ASYNC_SCHEDULER):
        raise SLoRAConfigError(
            f"vllm-slora replaces the scheduler, but --scheduler-cls {sched.scheduler_cls!r} "
            "was given; drop one of them"
        )
    sched.scheduler_cls = ASYNC_SCHEDULER if sched.async_scheduling else SCHEDULER
    compiled = _compile_on_cpu(vllm_config, requested_compile_mode)
    _cpu_cores_for_training(slora, vllm_config)
    trace.record("activated", worker_cls=parallel.worker_cls, scheduler_cls=sched.scheduler_cls,
                 compile_mode=str(vllm_config.compilation_config.mode), cpu_compile_restored=compiled)
    # The line to look for: without it, the `slora` key was ignored (plugin not loaded,
    # e.g. VLLM_PLUGINS set without `slora`; see README "Adapter sources and VLLM_PLUGINS").
    from vllm_slora.compat import logger

    logger.info("vllm-slora: active for this engine (scheduler %s, worker %s)", sched.scheduler_cls, parallel.worker_cls)
    return slora


def _cpu_cores_for_training(slora: SLoRAConfig, vllm_config) -> None:
    """A co-serving CPU engine gives its worker every core, the EngineCore's included.

    vLLM's CPU executor keeps one core per worker out of the worker's OpenMP team for the
    EngineCore process, which spins while it waits (vllm/utils/ompmultiprocessing.py
    "TODO: make scheduler proc sleep when idle"; on 2 cores the worker computes on one).
    With slora.finetune the EngineCore sleeps instead (patches/patch_shm_broadcast.py), so
    the reservation only idles a core that training could use. vLLM's pinning of the
    OpenMP threads stays: unpinned (``VLLM_CPU_OMP_THREADS_BIND=nobind``) an idle engine
    trained ~10 % faster on the 2-vCPU CI machine, but with any other process computing
    beside the server inference collapsed (8 concurrent decodes 15 vs 80 tok/s, an HF
    training loop beside it: no request finished in a minute); only idle training steps run
    unpinned (finetune/thread_affinity.py). Set before the EngineCore
    process starts (it inherits the environment); an explicit user setting is kept. It is
    process-wide: engines started later by the same process inherit it too.
    """
    import os

    from vllm_slora.compat import current_platform

    if not slora.finetune or not current_platform.is_cpu():
        return
    if vllm_config.parallel_config.world_size == 1 and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"


def _check_adapter_dirs(slora: SLoRAConfig, parallel) -> None:
    """`adapter_dirs` must exist where the API server runs, and there must be one API server.

    Checked here (the process that parses the arguments), not in SLoRAConfig: EngineCore
    processes, possibly on other nodes, parse the same section but never read the dirs.
    """
    for directory in slora.adapter_dirs:
        if not os.path.isdir(directory):
            raise SLoRAConfigError(f"slora config key 'adapter_dirs': {directory!r} is not a directory")
    # Each API server numbers the adapters it loads on its own; two servers resolving
    # names on first use would give different adapters the same lora_int_id (vLLM refuses
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING with --api-server-count > 1 for the same reason).
    if slora.adapter_dirs and getattr(parallel, "_api_process_count", 1) > 1:
        raise SLoRAConfigError(
            "slora config key 'adapter_dirs' needs a single API server; drop --api-server-count "
            f"(it is {parallel._api_process_count}) or list the adapters with --lora-modules"
        )


def _compile_on_cpu(vllm_config, requested_mode) -> bool:
    """Run plugin engines on CPU compiled, as vLLM runs the base model there.

    vLLM's CPU platform forces eager mode for every LoRA engine (its punica CPU path is
    not traceable). The plugin's paged layers are: their LoRA work is one opaque custom
    op reading static metadata (paged/layers.py), so the compiled graph is right for any
    adapter set. Restores exactly what the platform sets for engines without LoRA,
    unless the user asked for eager (`enforce_eager`, -O0, an explicit compilation mode,
    or TORCH_COMPILE_DISABLE=1).
    """
    from vllm_slora.compat import CompilationMode, current_platform

    config = vllm_config.compilation_config
    if (
        not current_platform.is_cpu()
        or vllm_config.model_config.enforce_eager
        or requested_mode is not None
        or int(vllm_config.optimization_level) == 0  # -O0
        or os.environ.get("TORCH_COMPILE_DISABLE") == "1"
        or config.mode != CompilationMode.NONE
    ):
        return False
    config.mode = CompilationMode.DYNAMO_TRACE_ONCE
    # vLLM's own CPU CI switch: trace with dynamo, run the graph eagerly (fast start-up).
    config.backend = "eager" if os.environ.get("VLLM_CPU_CI_ENV") == "1" else "inductor"
    config.inductor_compile_config.update(
        {"dce": True, "size_asserts": False, "nan_asserts": False, "epilogue_fusion": True,
         "cpp.dynamic_threads": True}
    )
    config.ir_enable_torch_wrap = False
    return True
