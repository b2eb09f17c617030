"""Pool metrics on /metrics: the scheduler's payload, its trip to the frontend, the Prometheus series."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from types import SimpleNamespace

import pytest

from vllm_slora import metrics
from vllm_slora.pool.residency import PoolStats, Residency

# ------------------------------------------------------------------------------------
# Fakes: a scheduler as metrics.py sees it (no engine)
# ------------------------------------------------------------------------------------


class FakeResidency:
    def __init__(self, states: dict[int, Residency], stats: PoolStats):
        self.states = states
        self._stats = stats
        self.state_calls = 0

    def state(self, lora_int_id):
        self.state_calls += 1
        return self.states.get(lora_int_id, Residency.ABSENT)

    def stats(self):
        return self._stats


def _request(lora_int_id=None, name=None, prompt=5, output=3):
    lora = None if lora_int_id is None else SimpleNamespace(lora_int_id=lora_int_id, lora_name=name or f"a{lora_int_id}")
    return SimpleNamespace(lora_request=lora, num_prompt_tokens=prompt, num_output_tokens=output)


POOL = PoolStats(total_blocks=101, free_blocks=60, pinned_adapters=2, cached_adapters=1,
                 pinned_adapter_blocks=12, cached_adapter_blocks=5, loads=4, evictions=1)


def _scheduler(*, waiting=(), report=None, drain=None, log_stats=True):
    sched = SimpleNamespace(
        slora_residency=FakeResidency({1: Residency.PINNED, 2: Residency.CACHED}, POOL),
        slora_registry={"a1": 1, "a2": 2, "a3": 3},
        waiting=deque(waiting),
        log_stats=log_stats,
        slora_worker_report=report,
    )
    if drain is not None:
        sched.slora_latency_observations = drain
    return sched


def _report(**kwargs):
    base = dict(host_cache={"hits": 3, "misses": 2, "bytes": 4096, "entries": 2, "warmed": 1},
                disk_read_seconds=[0.02, 0.03], pool_copy_seconds=[0.001])
    base.update(kwargs)
    return SimpleNamespace(**base)


# ------------------------------------------------------------------------------------
# EngineCore side
# ------------------------------------------------------------------------------------


def test_payload_reports_pool_by_kind_adapters_and_waiting_requests():
    waiting = [_request(1), _request(3), _request(3), _request(None), _request(4), _request(2)]
    payload = metrics.engine_payload(_scheduler(waiting=waiting))
    pool = payload["pool"]
    assert pool == {"kv": 100 - 60 - 12, "adapter_pinned": 12, "adapter_cached": 5, "free": 60 - 5, "training": 0}
    assert sum(pool.values()) == POOL.total_blocks - 1  # the null block is nobody's
    assert (payload["pinned_adapters"], payload["cached_adapters"], payload["registered_adapters"]) == (2, 1, 3)
    assert (payload["loads"], payload["evictions"]) == (4, 1)
    assert payload["waiting_for_adapter"] == 3  # adapters 3, 3, 4: no pool blocks; 1 pinned, 2 cached
    # Without a worker report: zeros, no observations.
    assert payload["host_cache"] == {"hits": 0, "misses": 0, "bytes": 0, "entries": 0}
    assert payload["disk_read_seconds"] == payload["pool_copy_seconds"] == []
    assert payload["adapters"] == {}


def test_waiting_scan_is_bounded_and_looks_up_each_adapter_once():
    residency = FakeResidency({}, POOL)
    waiting = deque(_request(i % 3) for i in range(10_000))
    assert metrics.waiting_for_adapter(waiting, residency, limit=100) == 100
    assert residency.state_calls == 3


def test_latencies_come_from_the_scheduler_drain_when_it_has_one():
    kept = {"disk": [0.5, 0.25], "copy": [0.01]}

    def drain():
        taken = kept["disk"], kept["copy"]
        kept["disk"], kept["copy"] = [], []
        return taken

    sched = _scheduler(report=_report(), drain=drain)
    first = metrics.engine_payload(sched)
    assert (first["disk_read_seconds"], first["pool_copy_seconds"]) == ([0.5, 0.25], [0.01])  # not the report's
    assert first["host_cache"] == {"hits": 3, "misses": 2, "bytes": 4096, "entries": 2}
    second = metrics.engine_payload(sched)
    assert second["disk_read_seconds"] == second["pool_copy_seconds"] == []


def test_latencies_of_a_report_are_taken_once_without_a_drain():
    sched = _scheduler(report=_report())
    assert metrics.engine_payload(sched)["disk_read_seconds"] == [0.02, 0.03]
    assert metrics.engine_payload(sched)["disk_read_seconds"] == []  # same report object: not again
    sched.slora_worker_report = _report(disk_read_seconds=[0.7], pool_copy_seconds=[])
    again = metrics.engine_payload(sched)
    assert (again["disk_read_seconds"], again["pool_copy_seconds"]) == ([0.7], [])


def test_finished_requests_are_counted_per_adapter_and_drained():
    sched = _scheduler()
    for request in (_request(1, "x", 10, 4), _request(1, "x", 6, 2), _request(2, "y", 3, 1), _request(None)):
        metrics.request_finished(sched, request)
    assert metrics.engine_payload(sched)["adapters"] == {"x": [2, 16, 6], "y": [1, 3, 1]}
    assert metrics.engine_payload(sched)["adapters"] == {}
    off = _scheduler(log_stats=False)
    metrics.request_finished(off, _request(1))
    assert metrics.engine_payload(off)["adapters"] == {}


def test_scheduler_hooks_attach_the_payload_and_count_finished_requests():
    from vllm.v1.metrics.stats import SchedulerStats

    from vllm_slora.scheduler import SLoRASchedulerMixin

    class Base:
        log_stats = True

        def make_stats(self, *args, **kwargs):
            return SchedulerStats(num_running_reqs=1) if self.log_stats else None

        def _free_request(self, request, delay_free_blocks=False):
            return None, None

    class Sched(SLoRASchedulerMixin, Base):
        def slora_latency_observations(self):  # the mixin's reads state its __init__ makes
            return [0.5], []

    sched = object.__new__(Sched)  # no engine: only what metrics.py reads
    vars(sched).update(vars(_scheduler()))
    assert sched._free_request(_request(1, "x", 10, 4), delay_free_blocks=True) == (None, None)
    stats = sched.make_stats()
    assert stats.num_running_reqs == 1
    payload = stats.kv_connector_stats[metrics.PAYLOAD_KEY]
    assert payload["adapters"] == {"x": [1, 10, 4]} and payload["disk_read_seconds"] == [0.5]
    sched.log_stats = False
    assert sched.make_stats() is None


def test_payload_survives_vllm_serialization_and_is_taken_out_cleanly():
    """The engine -> frontend hop is msgspec typed as SchedulerStats: only dict fields carry extras."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    sched = _scheduler(report=_report())
    metrics.request_finished(sched, _request(1, "x", 10, 4))

    def hop(stats):
        encoded = MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=stats))
        return MsgpackDecoder(EngineCoreOutputs).decode(encoded).scheduler_stats

    plain = hop(metrics.attach(sched, SchedulerStats()))
    payload = metrics.take_payload(plain)
    assert payload["adapters"] == {"x": [1, 10, 4]} and payload["disk_read_seconds"] == [0.02, 0.03]
    assert plain.kv_connector_stats is None  # as stock made it
    with_connector = hop(metrics.attach(sched, SchedulerStats(kv_connector_stats={"nixl": {"n": 1}})))
    assert metrics.take_payload(with_connector)["pool"]["adapter_pinned"] == 12
    assert with_connector.kv_connector_stats == {"nixl": {"n": 1}}
    assert metrics.take_payload(with_connector) is None
    assert metrics.attach(sched, None) is None


# ------------------------------------------------------------------------------------
# Frontend side
# ------------------------------------------------------------------------------------


def _samples(text: str) -> dict[str, float]:
    """'name{labels}' -> value, for every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _metric(samples: dict[str, float], name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        metric, _, label_text = key.partition("{")
        if metric == name and all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += value
    return total


def _exposition() -> dict[str, float]:
    from prometheus_client import REGISTRY, generate_latest

    return _samples(generate_latest(REGISTRY).decode())


def _payload(**overrides):
    payload = {
        "pool": {"kv": 28, "adapter_pinned": 12, "adapter_cached": 5, "free": 55},
        "pinned_adapters": 2, "cached_adapters": 1, "registered_adapters": 3, "loads": 4, "evictions": 1,
        "waiting_for_adapter": 7, "host_cache": {"hits": 3, "misses": 2, "bytes": 4096, "entries": 2},
        "disk_read_seconds": [0.02, 0.03], "pool_copy_seconds": [0.001], "adapters": {"x": [2, 16, 6]},
    }
    payload.update(overrides)
    return payload


def test_prometheus_series_from_payloads():
    prom = metrics.SLoRAPrometheus("base", [0], adapter_label_limit=2)
    prom.observe(_payload())
    prom.observe(_payload(loads=6, host_cache={"hits": 5, "misses": 2, "bytes": 8192, "entries": 3},
                          disk_read_seconds=[], pool_copy_seconds=[0.002], pool={"kv": 30, "adapter_pinned": 10,
                          "adapter_cached": 5, "free": 55},
                          adapters={"x": [1, 2, 3], "y": [1, 1, 1], "z": [4, 4, 4], "w": [1, 0, 0]}))
    s = _exposition()
    e = dict(model_name="base", engine="0")

    def m(name, **labels):
        return _metric(s, "vllm_slora:" + name, **e, **labels)

    assert m("pool_blocks", kind="kv") == 30 and m("pool_blocks", kind="adapter_pinned") == 10
    assert m("adapters_resident", state="pinned") == 2 and m("adapters_resident", state="cached") == 1
    assert m("adapters_registered") == 3 and m("requests_waiting_for_adapter") == 7
    # Cumulative engine figures become counters that count each event once.
    assert m("adapter_loads_total") == 6 and m("adapter_evictions_total") == 1
    assert m("host_cache_hits_total") == 5 and m("host_cache_misses_total") == 2
    assert m("host_cache_bytes") == 8192 and m("host_cache_entries") == 3
    assert m("adapter_disk_read_seconds_count") == 2
    assert m("adapter_pool_copy_seconds_count") == 2
    assert m("adapter_pool_copy_seconds_sum") == pytest.approx(0.003)
    # Per adapter: the first two names get a series, later ones share one.
    assert m("adapter_requests_total", adapter="x") == 3 and m("adapter_generation_tokens_total", adapter="x") == 9
    assert m("adapter_prompt_tokens_total", adapter="y") == 1
    assert m("adapter_requests_total", adapter="__other__") == 5
    assert not any('adapter="z"' in k or 'adapter="w"' in k for k in s)
    # A new logger (vLLM re-creates loggers) starts clean instead of failing on duplicates.
    metrics.SLoRAPrometheus("base", [0, 1])
    fresh = _exposition()
    assert not any(k.startswith("vllm_slora:adapter_requests_total{") for k in fresh)
    # ... with every engine's series present at 0 before the first payload.
    for engine in ("0", "1"):
        for name, labels in (("adapter_evictions_total", {}), ("pool_blocks", {"kind": "adapter_cached"})):
            found = [k for k in fresh if k.startswith(f"vllm_slora:{name}{{") and f'engine="{engine}"' in k
                     and all(f'{k_}="{v}"' in k for k_, v in labels.items())]
            assert len(found) == 1 and fresh[found[0]] == 0, (name, engine)


def test_max_lora_label_is_what_the_user_set():
    def config(max_loras, max_num_seqs=128):
        return SimpleNamespace(lora_config=SimpleNamespace(max_loras=max_loras),
                               scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))

    assert metrics.max_lora_label(config(128)) == "None"  # raised by activation: no cap
    assert metrics.max_lora_label(config(4)) == "4"


def _engine_config(model, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), max_model_len=256, enable_lora=True, **kwargs).create_engine_config()


def test_stat_logger_manager_serves_slora_metrics_only_for_slora_engines(tiny_model):
    """vLLM's StatLoggerManager as the API server builds it: slora engines get the subclass."""
    import vllm_slora
    from vllm_slora.compat import PrometheusStatLogger, StatLoggerManager

    vllm_slora.register()
    from vllm.v1.metrics.stats import SchedulerStats

    stock = StatLoggerManager(vllm_config=_engine_config(tiny_model), custom_stat_loggers=None)
    assert [type(lg) for lg in stock.stat_loggers if isinstance(lg, PrometheusStatLogger)] == [PrometheusStatLogger]

    config = _engine_config(tiny_model, additional_config={"slora": {}})
    manager = StatLoggerManager(vllm_config=config, engine_idxs=[0], custom_stat_loggers=None,
                                enable_default_loggers=True)
    proms = [lg for lg in manager.stat_loggers if isinstance(lg, PrometheusStatLogger)]
    assert [type(lg) for lg in proms] == [metrics.prometheus_logger_cls()]
    stats = SchedulerStats(num_running_reqs=1, kv_connector_stats={metrics.PAYLOAD_KEY: _payload()},
                           running_lora_adapters={"x": 1})
    manager.record(scheduler_stats=stats, iteration_stats=None, engine_idx=0)  # stock loggers see no payload
    manager.log()
    assert stats.kv_connector_stats is None
    s = _exposition()
    assert any(k.startswith("vllm_slora:adapter_loads_total{") and v == 4 for k, v in s.items())
    info = [k for k in s if k.startswith("vllm:lora_requests_info{")]
    assert info and all('max_lora="None"' in k for k in info), info
    assert config.lora_config.max_loras == config.scheduler_config.max_num_seqs  # what stock would print


# ------------------------------------------------------------------------------------
# End to end: `vllm serve`, two adapters, GET /metrics
# ------------------------------------------------------------------------------------


@pytest.mark.engine
def test_server_metrics_match_what_happened(default_model, default_adapters):
    import httpx
    from openai import AsyncOpenAI

    from vllm_slora.server_process import ServerProcess

    first, second = default_adapters[:2]
    sent = {first.name: 3, second.name: 2}
    args = [
        "--served-model-name", "base", "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
        "--kv-cache-memory-bytes", str(512 << 20), "--enable-lora", "--max-lora-rank", "64",
        "--lora-modules", f"{first.name}={first.path}", f"{second.name}={second.path}",
        "--additional-config", json.dumps({"slora": {}}),
    ]
    with ServerProcess(default_model, args) as server:

        async def scenario():
            client = AsyncOpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
            calls = [client.completions.create(model=name, prompt="Hello", max_tokens=4, temperature=0.0)
                     for name, n in sent.items() for _ in range(n)]
            outs = await asyncio.gather(*calls)
            await client.close()
            return outs

        outs = asyncio.run(scenario())
        generated = {name: 0 for name in sent}
        for out in outs:
            generated[out.model] += out.usage.completion_tokens
        # The last step's stats are recorded right after its outputs go out: poll briefly.
        deadline = time.monotonic() + 15
        while True:
            samples = _samples(httpx.get(f"{server.base_url}/metrics", timeout=10).text)
            done = [_metric(samples, "vllm_slora:adapter_requests_total", adapter=n) for n in sent]
            if done == list(sent.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)

    for name, n in sent.items():
        assert _metric(samples, "vllm_slora:adapter_requests_total", adapter=name) == n
        assert _metric(samples, "vllm_slora:adapter_generation_tokens_total", adapter=name) == generated[name]
        assert _metric(samples, "vllm_slora:adapter_prompt_tokens_total", adapter=name) > 0
    assert _metric(samples, "vllm_slora:adapter_loads_total") >= 2
    assert _metric(samples, "vllm_slora:adapters_registered") >= 2
    resident = _metric(samples, "vllm_slora:adapters_resident")
    assert resident + _metric(samples, "vllm_slora:adapter_evictions_total") >= 2
    assert _metric(samples, "vllm_slora:pool_blocks", kind="adapter_pinned") + _metric(
        samples, "vllm_slora:pool_blocks", kind="adapter_cached") > 0
    # Blocks by kind add up to the pool vLLM reports (less its null block).
    (cache_info,) = [k for k in samples if k.startswith("vllm:cache_config_info{")]
    num_blocks = int(re.search(r'num_gpu_blocks="(\d+)"', cache_info).group(1))
    assert _metric(samples, "vllm_slora:pool_blocks") == num_blocks - 1
    # Both adapters were read from disk once (host cache misses, disk -> host latencies).
    assert _metric(samples, "vllm_slora:host_cache_misses_total") >= 2
    assert _metric(samples, "vllm_slora:adapter_disk_read_seconds_count") >= 2
    assert _metric(samples, "vllm_slora:adapter_pool_copy_seconds_count") >= 2
    assert _metric(samples, "vllm_slora:requests_waiting_for_adapter") == 0
    info = [k for k in samples if k.startswith("vllm:lora_requests_info{")]
    assert info and all('max_lora="None"' in k for k in info), info
