"""Prometheus metrics of the unified pool, next to vLLM's own on `/metrics`.

Two halves, in two processes:

* EngineCore (scheduler side). Every step vLLM's scheduler builds a `SchedulerStats` in
  `make_stats`; the slora scheduler adds one plain dict (`engine_payload`): pool blocks by
  kind, resident / registered adapters, cumulative loads and evictions, the workers'
  host-cache figures and load latencies since the last step, waiting requests whose
  adapter is not resident, and per-adapter request / token counts of requests finished
  since the last step. It travels under the key `vllm_slora` of
  `SchedulerStats.kv_connector_stats`: the stats cross the process boundary through a
  msgspec decoder typed `SchedulerStats`, which drops any field a subclass adds, and that
  dict (`dict[str, Any]`) is the one free-form field. patches/patch_loggers.py takes it
  out again before any vLLM logger (which would hand it to a KV connector) sees it.
* API server / `LLM` process (frontend side). `SLoRAPrometheus` turns the payloads into
  prometheus_client metrics (prefix `vllm_slora:`, labels `model_name` and `engine` as
  vLLM's); `prometheus_logger_cls()` is vLLM's `PrometheusStatLogger` with those added
  and with an honest `max_lora` label on `vllm:lora_requests_info`.

Per-adapter series are bounded: the first `ADAPTER_LABEL_LIMIT` adapter names seen get
their own `adapter` label, every later one is counted under `adapter="__other__"`. (Not
a moving top-N: a name that changed series would make counters jump backwards.)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import lru_cache

PAYLOAD_KEY = "vllm_slora"
METRIC_PREFIX = "vllm_slora:"
ADAPTER_LABEL_LIMIT = 32
OTHER_ADAPTERS = "__other__"
POOL_KINDS = ("kv", "adapter_pinned", "adapter_cached", "free", "training")
# Waiting requests looked at per step for `requests_waiting_for_adapter` (the head of the
# queue; beyond it the gauge is a lower bound). Keeps the per-step cost fixed.
WAITING_SCAN_LIMIT = 1024

# Seconds. Disk -> host: read + validate + pack one adapter (ms .. tens of s on slow disks).
DISK_READ_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Host -> pool: copy one adapter's pages into the block pool (us .. s).
POOL_COPY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# ------------------------------------------------------------------------------------
# EngineCore side
# ------------------------------------------------------------------------------------


@dataclass
class _EngineState:
    """What the scheduler keeps between payloads (created on first use)."""

    # adapter name -> [requests, prompt tokens, generation tokens] finished since the last payload
    finished: dict[str, list[int]] = field(default_factory=dict)
    last_report: object = None  # the worker report whose latency lists were already taken


def _engine_state(scheduler) -> _EngineState:
    state = getattr(scheduler, "_slora_metrics_state", None)
    if state is None:
        state = _EngineState()
        scheduler._slora_metrics_state = state
    return state


def request_finished(scheduler, request) -> None:
    """Count a finished request (any reason) and its tokens against its adapter."""
    lora = getattr(request, "lora_request", None)
    if lora is None or not getattr(scheduler, "log_stats", False):
        return
    counts = _engine_state(scheduler).finished.setdefault(lora.lora_name, [0, 0, 0])
    counts[0] += 1
    counts[1] += request.num_prompt_tokens
    counts[2] += request.num_output_tokens


def waiting_for_adapter(waiting, residency, limit: int = WAITING_SCAN_LIMIT) -> int:
    """Requests among the first `limit` of `waiting` whose adapter has no pool blocks."""
    from vllm_slora.pool.residency import Residency

    absent: dict[int, bool] = {}
    count = 0
    for request in itertools.islice(waiting, limit):
        lora = request.lora_request
        if lora is None:
            continue
        lora_int_id = lora.lora_int_id
        is_absent = absent.get(lora_int_id)
        if is_absent is None:
            is_absent = absent[lora_int_id] = residency.state(lora_int_id) is Residency.ABSENT
        count += is_absent
    return count


def _latencies(scheduler, state: _EngineState) -> tuple[list[float], list[float]]:
    """(disk->host, host->pool) seconds observed by the workers since the last call."""
    drain = getattr(scheduler, "slora_latency_observations", None)
    if callable(drain):
        disk, copy = drain()
        return list(disk), list(copy)
    report = getattr(scheduler, "slora_worker_report", None)
    if report is None or report is state.last_report:
        return [], []
    state.last_report = report  # each report's lists are taken once
    return (list(getattr(report, "disk_read_seconds", None) or ()),
            list(getattr(report, "pool_copy_seconds", None) or ()))


def engine_payload(scheduler) -> dict:
    """This step's figures, as plain msgpack-able values."""
    state = _engine_state(scheduler)
    stats = scheduler.slora_residency.stats()
    loan = getattr(scheduler, "slora_training_loan", None)
    lent = loan.num_blocks if loan is not None else 0  # held like KV blocks, but by training
    report = getattr(scheduler, "slora_worker_report", None)
    host_cache = dict(getattr(report, "host_cache", None) or {})
    disk, copy = _latencies(scheduler, state)
    finished, state.finished = state.finished, {}
    return {
        "pool": {
            "kv": stats.kv_blocks - lent,
            "adapter_pinned": stats.pinned_adapter_blocks,
            "training": lent,
            "adapter_cached": stats.cached_adapter_blocks,
            "free": stats.free_blocks - stats.cached_adapter_blocks,
        },
        "pinned_adapters": stats.pinned_adapters,
        "cached_adapters": stats.cached_adapters,
        "registered_adapters": len(scheduler.slora_registry),
        "loads": stats.loads,
        "evictions": stats.evictions,
        "waiting_for_adapter": waiting_for_adapter(scheduler.waiting, scheduler.slora_residency),
        "host_cache": {k: int(host_cache.get(k, 0)) for k in ("hits", "misses", "bytes", "entries")},
        "disk_read_seconds": disk,
        "pool_copy_seconds": copy,
        "adapters": finished,
    }


def attach(scheduler, scheduler_stats):
    """Add this step's payload to vLLM's SchedulerStats (None when stats are off)."""
    if scheduler_stats is None:
        return None
    extra = dict(scheduler_stats.kv_connector_stats or {})
    extra[PAYLOAD_KEY] = engine_payload(scheduler)
    scheduler_stats.kv_connector_stats = extra
    return scheduler_stats


# ------------------------------------------------------------------------------------
# Frontend side
# ------------------------------------------------------------------------------------


def take_payload(scheduler_stats) -> dict | None:
    """Remove and return the slora payload, leaving the stats as stock vLLM made them."""
    extra = getattr(scheduler_stats, "kv_connector_stats", None)
    if not extra or PAYLOAD_KEY not in extra:
        return None
    payload = extra.pop(PAYLOAD_KEY)
    if not extra:
        scheduler_stats.kv_connector_stats = None
    return payload


def max_lora_label(vllm_config) -> str:
    """`max_lora` of `vllm:lora_requests_info`: the user's --max-loras cap, or "None".

    With vllm-slora, adapters live in pool blocks, not in `max_loras` fixed slots; unless
    the user sets --max-loras, activation raises it to --max-num-seqs (activation.py), i.e.
    nothing but the batch size bounds the adapters in a batch. That is reported as "None"
    (vLLM's way of printing an unset value in its *_info metrics), not as a cap the user
    never chose. An explicit cap equal to --max-num-seqs caps nothing either.
    """
    max_loras = vllm_config.lora_config.max_loras
    if max_loras == vllm_config.scheduler_config.max_num_seqs:
        return "None"
    return str(max_loras)


class SLoRAPrometheus:
    """The `vllm_slora:` metrics of one frontend, fed with engine payloads."""

    def __init__(self, model_name: str, engine_indexes, *, gauge_cls=None, counter_cls=None, histogram_cls=None,
                 adapter_label_limit: int = ADAPTER_LABEL_LIMIT) -> None:
        import prometheus_client

        gauge = gauge_cls or prometheus_client.Gauge
        counter = counter_cls or prometheus_client.Counter
        histogram = histogram_cls or prometheus_client.Histogram
        unregister_slora_metrics()
        self.model_name = model_name
        self.engine_labels = {idx: [model_name, str(idx)] for idx in engine_indexes}
        self.adapter_label_limit = adapter_label_limit
        self._adapter_labels: set[str] = set()
        self._last: dict[tuple[int, str], int] = {}  # (engine, key) -> last cumulative value
        names = ["model_name", "engine"]
        p = METRIC_PREFIX

        def g(name, doc, extra=()):
            return gauge(name=p + name, documentation=doc, labelnames=names + list(extra),
                         multiprocess_mode="mostrecent")

        def c(name, doc, extra=()):
            return counter(name=p + name, documentation=doc, labelnames=names + list(extra))

        def h(name, doc, buckets):
            return histogram(name=p + name, documentation=doc, labelnames=names, buckets=list(buckets))

        self.pool_blocks = g("pool_blocks", "Blocks of the unified KV/adapter pool by kind: kv (KV cache), "
                             "adapter_pinned (adapters of running requests), adapter_cached (resident, "
                             "reclaimable adapters), training (lent to co-served finetuning's activations, "
                             "called back under KV pressure), free. The kinds sum to the pool's capacity.", ["kind"])
        self.adapters_resident = g("adapters_resident", "Adapters with weights in the pool, by state "
                                   "(pinned: used by running requests; cached: kept warm, reclaimable).", ["state"])
        self.adapters_registered = g("adapters_registered", "Adapters the engine has validated and knows by name.")
        self.adapter_loads = c("adapter_loads", "Adapters put into pool pages (host -> pool loads).")
        self.adapter_evictions = c("adapter_evictions", "Cached adapters whose pool blocks the KV cache reclaimed.")
        self.waiting_for_adapter = g("requests_waiting_for_adapter", "Waiting requests whose adapter has no "
                                     f"pool blocks (first {WAITING_SCAN_LIMIT} of the queue).")
        self.host_cache_hits = c("host_cache_hits", "Adapter loads served from the workers' host cache.")
        self.host_cache_misses = c("host_cache_misses", "Adapter loads that read the adapter from disk.")
        self.host_cache_bytes = g("host_cache_bytes", "Bytes of packed adapters in the workers' host cache.")
        self.host_cache_entries = g("host_cache_entries", "Adapters in the workers' host cache.")
        self.disk_read_seconds = h("adapter_disk_read_seconds", "Disk -> host: reading, validating and packing "
                                   "one adapter.", DISK_READ_BUCKETS)
        self.pool_copy_seconds = h("adapter_pool_copy_seconds", "Host -> pool: copying one adapter's pages into "
                                   "the block pool.", POOL_COPY_BUCKETS)
        doc = f" (first {adapter_label_limit} adapters by name, the rest as adapter=\"{OTHER_ADAPTERS}\")."
        self.adapter_requests = c("adapter_requests", "Finished requests per adapter" + doc, ["adapter"])
        self.adapter_prompt_tokens = c("adapter_prompt_tokens", "Prompt tokens of finished requests per adapter"
                                       + doc, ["adapter"])
        self.adapter_generation_tokens = c("adapter_generation_tokens", "Generated tokens of finished requests "
                                           "per adapter" + doc, ["adapter"])

        # Every engine's series exist from the start (at 0), as vLLM's do.
        for labels in self.engine_labels.values():
            for kind in POOL_KINDS:
                self.pool_blocks.labels(*labels, kind)
            for state in ("pinned", "cached"):
                self.adapters_resident.labels(*labels, state)
            for metric in (self.adapters_registered, self.adapter_loads, self.adapter_evictions,
                           self.waiting_for_adapter, self.host_cache_hits, self.host_cache_misses,
                           self.host_cache_bytes, self.host_cache_entries, self.disk_read_seconds,
                           self.pool_copy_seconds):
                metric.labels(*labels)

    def adapter_label(self, name: str) -> str:
        if name in self._adapter_labels:
            return name
        if len(self._adapter_labels) < self.adapter_label_limit:
            self._adapter_labels.add(name)
            return name
        return OTHER_ADAPTERS

    def _inc_cumulative(self, metric, labels, engine_idx: int, key: str, value: int) -> None:
        last = self._last.get((engine_idx, key), 0)
        delta = value - last if value >= last else value  # smaller: the engine restarted
        self._last[(engine_idx, key)] = value
        if delta:
            metric.labels(*labels).inc(delta)

    def observe(self, payload: dict, engine_idx: int = 0) -> None:
        labels = self.engine_labels.get(engine_idx) or [self.model_name, str(engine_idx)]
        for kind, blocks in payload["pool"].items():
            self.pool_blocks.labels(*labels, kind).set(blocks)
        self.adapters_resident.labels(*labels, "pinned").set(payload["pinned_adapters"])
        self.adapters_resident.labels(*labels, "cached").set(payload["cached_adapters"])
        self.adapters_registered.labels(*labels).set(payload["registered_adapters"])
        self.waiting_for_adapter.labels(*labels).set(payload["waiting_for_adapter"])
        self._inc_cumulative(self.adapter_loads, labels, engine_idx, "loads", payload["loads"])
        self._inc_cumulative(self.adapter_evictions, labels, engine_idx, "evictions", payload["evictions"])
        host = payload["host_cache"]
        self._inc_cumulative(self.host_cache_hits, labels, engine_idx, "hits", host["hits"])
        self._inc_cumulative(self.host_cache_misses, labels, engine_idx, "misses", host["misses"])
        self.host_cache_bytes.labels(*labels).set(host["bytes"])
        self.host_cache_entries.labels(*labels).set(host["entries"])
        for seconds in payload["disk_read_seconds"]:
            self.disk_read_seconds.labels(*labels).observe(seconds)
        for seconds in payload["pool_copy_seconds"]:
            self.pool_copy_seconds.labels(*labels).observe(seconds)
        for name, (requests, prompt_tokens, generation_tokens) in payload["adapters"].items():
            adapter = (*labels, self.adapter_label(name))
            self.adapter_requests.labels(*adapter).inc(requests)
            self.adapter_prompt_tokens.labels(*adapter).inc(prompt_tokens)
            self.adapter_generation_tokens.labels(*adapter).inc(generation_tokens)


def unregister_slora_metrics() -> None:
    """Drop earlier `vllm_slora:` collectors (a new logger re-creates them, as vLLM does for `vllm:`)."""
    from prometheus_client import REGISTRY

    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith(METRIC_PREFIX):
            REGISTRY.unregister(collector)


@lru_cache(maxsize=1)
def prometheus_logger_cls():
    """vLLM's PrometheusStatLogger plus the `vllm_slora:` metrics (built on first use)."""
    from vllm_slora.compat import PrometheusStatLogger

    class SLoRAPrometheusStatLogger(PrometheusStatLogger):
        def __init__(self, vllm_config, engine_indexes=None) -> None:
            super().__init__(vllm_config, engine_indexes)
            if self.gauge_lora_info is not None:
                self.max_lora = max_lora_label(vllm_config)
            self.slora = SLoRAPrometheus(
                vllm_config.model_config.served_model_name, self.engine_indexes,
                gauge_cls=self._gauge_cls, counter_cls=self._counter_cls, histogram_cls=self._histogram_cls,
            )

        def record_slora(self, payload: dict, engine_idx: int = 0) -> None:
            self.slora.observe(payload, engine_idx)

    return SLoRAPrometheusStatLogger
