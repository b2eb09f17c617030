"""Let `distributed_executor_backend="ray"` run on vLLM's CPU platform.

Why: the CPU platform leaves `Platform.ray_device_key` empty (vllm/platforms/interface.py:150),
and every Ray code path refuses that: `initialize_ray_cluster` (vllm/v1/executor/ray_utils.py:572-576),
`get_bundles_sorted_by_node` (ray_utils.py:416-420) and, inside each worker actor,
`RayWorkerProc.get_node_and_physical_gpu_ids` (vllm/v1/executor/ray_executor_v2.py:147-151) raise
"current platform cpu does not support ray". So the plugin's Ray path cannot be run without a GPU.

How: a wrapper around `CpuPlatform.check_and_update_config` (the hook that validates the config,
in the process that builds it). Only if the backend is exactly "ray", RayExecutorV2 is selected
(VLLM_USE_RAY_V2_EXECUTOR_BACKEND, the default) and the engine has the `slora` key, it replaces
the backend with `CpuRayExecutor`, a RayExecutorV2 subclass (`uses_ray` stays True). The class
travels to EngineCore inside VllmConfig, so nothing has to be patched there or in the actors.
It differs from RayExecutorV2 in three places, all inside its own `_init_executor`:
  * `current_platform.ray_device_key = "CPU"` for the duration of `_init_executor`, so the
    placement group is one `{"CPU": 1}` bundle per rank (restored afterwards);
  * `_get_actor_resource_kwargs` returns `{"num_gpus": 0}`: Ray forbids "CPU" in `resources=`,
    and the actor (created with `num_cpus=0`, as for GPUs) runs inside its bundle, which
    holds the core;
  * the actors are `CpuRayWorkerProc`, whose `get_node_and_physical_gpu_ids` returns no
    accelerator ids (Ray assigns none to CPU actors; `get_accelerator_ids()` has no "CPU"
    key). CPU workers never read the mapping; they bind cores from VLLM_CPU_OMP_THREADS_BIND.
Everything else (message queues, gloo TP group, worker classes) is stock RayExecutorV2.
The two classes are built on first access (module `__getattr__`), so importing this module
imports neither vLLM nor Ray; they pickle by reference as `<this module>.CpuRayExecutor`.
The legacy compiled-DAG RayDistributedExecutor (VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0) is left
alone and still refused.

Removal: drop when vLLM's CPU platform sets `ray_device_key` (upstream: CPU Ray support in
RayExecutorV2), or when the plugin stops needing the Ray path to be testable on CPU.
"""

from __future__ import annotations

_ORIGINAL_ATTR = "_vllm_slora_original"
RAY_DEVICE_KEY = "CPU"
_CLASS_NAMES = ("CpuRayExecutor", "CpuRayWorkerProc")
_classes: dict[str, type] = {}


def apply() -> None:
    from vllm_slora.compat import cpu_platform_internals

    CpuPlatform, _ = cpu_platform_internals()

    current = CpuPlatform.check_and_update_config
    if hasattr(current, _ORIGINAL_ATTR):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        current(vllm_config)
        if wants_cpu_ray(vllm_config):
            vllm_config.parallel_config.distributed_executor_backend = __getattr__("CpuRayExecutor")

    setattr(check_and_update_config, _ORIGINAL_ATTR, current)
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


def wants_cpu_ray(vllm_config) -> bool:
    """The user asked for the Ray backend (V2 executor) on an engine with the `slora` key."""
    from vllm_slora.compat import cpu_platform_internals

    _, envs = cpu_platform_internals()  # VLLM_USE_RAY_V2_EXECUTOR_BACKEND selects the Ray executor
    additional = vllm_config.additional_config
    return (
        vllm_config.parallel_config.distributed_executor_backend == "ray"
        and bool(envs.VLLM_USE_RAY_V2_EXECUTOR_BACKEND)
        and isinstance(additional, dict)
        and "slora" in additional
    )


def __getattr__(name: str) -> type:
    if name not in _CLASS_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _classes:
        _build_classes()
    return _classes[name]


def _build_classes() -> None:
    from vllm_slora.compat import ray_executor_internals

    current_platform, ray_executor_v2 = ray_executor_internals()

    class CpuRayWorkerProc(ray_executor_v2.RayWorkerProc):
        """RayWorkerProc for a CPU actor: Ray assigns it no accelerator ids."""

        def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
            return ray_executor_v2.ray.get_runtime_context().get_node_id(), []

    class CpuRayExecutor(ray_executor_v2.RayExecutorV2):
        """RayExecutorV2 with one {"CPU": 1} placement-group bundle per rank."""

        @staticmethod
        def _get_actor_resource_kwargs() -> dict:
            return {"num_gpus": 0}

        def _init_executor(self) -> None:
            saved_key = current_platform.ray_device_key
            saved_proc = ray_executor_v2.RayWorkerProc
            current_platform.ray_device_key = RAY_DEVICE_KEY
            ray_executor_v2.RayWorkerProc = CpuRayWorkerProc
            try:
                super()._init_executor()
            finally:
                current_platform.ray_device_key = saved_key
                ray_executor_v2.RayWorkerProc = saved_proc

    for cls in (CpuRayWorkerProc, CpuRayExecutor):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        _classes[cls.__name__] = cls
