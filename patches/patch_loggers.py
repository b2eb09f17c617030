"""Serve the unified pool's metrics on `/metrics`, next to vLLM's.

`StatLoggerManager` (vllm/v1/metrics/loggers.py:1358) creates vLLM's
`PrometheusStatLogger` itself unless a custom Prometheus logger is passed in. For engines
with the `slora` key we pass vllm-slora's subclass (vllm_slora/metrics.py: the
`vllm_slora:` metrics and an honest `max_lora` label), first in the list, so the manager
uses it instead of the stock one. Each `record` first takes the slora payload out of
`SchedulerStats.kv_connector_stats` (where the slora scheduler puts it, see metrics.py),
so vLLM's loggers see the stats exactly as stock, then hands it to the loggers that
have `record_slora`. See PATCHES in __init__.
"""

from __future__ import annotations

import inspect

_ORIGINAL_ATTR = "_vllm_slora_original"


def _slora_enabled(vllm_config) -> bool:
    from vllm_slora.config import SLoRAConfig

    try:
        return SLoRAConfig.from_additional_config(getattr(vllm_config, "additional_config", None)) is not None
    except ValueError:
        return False  # a bad section stops start-up elsewhere, with its own message


def apply() -> None:
    from vllm_slora.compat import PrometheusStatLogger, StatLoggerManager

    current_init = StatLoggerManager.__init__
    if hasattr(current_init, _ORIGINAL_ATTR):
        return
    current_record = StatLoggerManager.record
    signature = inspect.signature(current_init)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        custom = bound.arguments.get("custom_stat_loggers") or ()
        if _slora_enabled(bound.arguments["vllm_config"]) and not any(
            isinstance(f, type) and issubclass(f, PrometheusStatLogger) for f in custom
        ):
            from vllm_slora.metrics import prometheus_logger_cls

            bound.arguments["custom_stat_loggers"] = [prometheus_logger_cls(), *custom]
        current_init(*bound.args, **bound.kwargs)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=None):
        from vllm_slora.metrics import take_payload

        payload = take_payload(scheduler_stats) if scheduler_stats is not None else None
        current_record(self, scheduler_stats, iteration_stats, mm_cache_stats=mm_cache_stats, engine_idx=engine_idx)
        if payload is not None:
            for stat_logger in self.stat_loggers:
                record_slora = getattr(stat_logger, "record_slora", None)
                if record_slora is not None:
                    record_slora(payload, engine_idx or 0)

    setattr(__init__, _ORIGINAL_ATTR, current_init)
    setattr(record, _ORIGINAL_ATTR, current_record)
    StatLoggerManager.__init__ = __init__
    StatLoggerManager.record = record
