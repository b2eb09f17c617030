"""vllm-slora's scheduler, run in the EngineCore process when the plugin is enabled.

`SLoRAScheduler` / `SLoRAAsyncScheduler` subclass vLLM's two schedulers with one shared
mixin, so the choice between them stays vLLM's (async scheduling on or off).
"""

from __future__ import annotations

from vllm_slora import trace
from vllm_slora.compat import AsyncScheduler, Scheduler
from vllm_slora.config import SLoRAConfig


class SLoRASchedulerMixin:
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.slora_config = SLoRAConfig.from_additional_config(vllm_config.additional_config)
        trace.record("scheduler_init", cls=type(self).__name__)


class SLoRAScheduler(SLoRASchedulerMixin, Scheduler):
    pass


class SLoRAAsyncScheduler(SLoRASchedulerMixin, AsyncScheduler):
    pass
