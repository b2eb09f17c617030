"""vllm-slora's worker classes, selected through `parallel_config.worker_cls`.

One mixin over vLLM's platform workers (CPU and CUDA), so every executor that builds
workers from `worker_cls` (mp, Ray, uniproc) runs them. The worker's one job beyond
stock is to give its model runner the paged-LoRA behaviour right after creating it
(vllm_slora/paged/runner.py); everything per step happens in the runner, because the
legacy Ray DAG calls the runner's execute_model without going through the worker.
"""

from __future__ import annotations

from vllm_slora import trace
from vllm_slora.compat import cpu_worker_cls, gpu_worker_cls
from vllm_slora.config import SLoRAConfig
from vllm_slora.paged.runner import install_runner_mixin


class SLoRAWorkerMixin:
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.slora_config = SLoRAConfig.from_additional_config(vllm_config.additional_config)
        trace.record("worker_init", cls=type(self).__name__, rank=getattr(self, "rank", None))

    def init_device(self) -> None:
        super().init_device()  # creates self.model_runner; load_model comes later
        if self.slora_config is not None:
            install_runner_mixin(self.model_runner, self.slora_config)
            trace.record("runner_hooked", cls=type(self.model_runner).__name__)

    def slora_info(self) -> dict:
        """RPC target (`collective_rpc("slora_info")`): what this worker runs."""
        return {
            "worker_cls": type(self).__name__,
            "rank": self.rank,
            "slora_config": self.slora_config.__dict__ if self.slora_config else None,
        }


class SLoRACPUWorker(SLoRAWorkerMixin, cpu_worker_cls()):
    pass


class SLoRAGPUWorker(SLoRAWorkerMixin, gpu_worker_cls()):
    pass
