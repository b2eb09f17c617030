"""One flag switches vllm-slora on; without it vLLM runs stock classes."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from vllm_slora import trace
from vllm_slora.config import SLoRAConfigError

STOCK_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"


def test_entry_point_is_installed():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("slora") == "vllm_slora:register"
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("vllm-slora") == "vllm_slora.cli:main"


def test_importing_the_package_does_not_import_vllm():
    code = "import sys, vllm_slora; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_register_is_idempotent():
    from vllm.engine.arg_utils import EngineArgs

    import vllm_slora

    vllm_slora.register()
    vllm_slora.register()
    wrapped = EngineArgs.create_engine_config
    original = wrapped._vllm_slora_original
    assert not hasattr(original, "_vllm_slora_original"), "patched twice"


def _engine_config(model, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), max_model_len=256, **kwargs).create_engine_config()


def test_without_flag_config_keeps_stock_classes(tiny_model):
    cfg = _engine_config(tiny_model, enable_lora=True)
    assert cfg.parallel_config.worker_cls == STOCK_WORKER
    assert cfg.scheduler_config.scheduler_cls is None


def test_with_flag_config_selects_slora_classes(tiny_model):
    cfg = _engine_config(tiny_model, enable_lora=True, additional_config={"slora": {}})
    assert cfg.parallel_config.worker_cls == "vllm_slora.worker.SLoRACPUWorker"
    assert cfg.scheduler_config.scheduler_cls in (
        "vllm_slora.scheduler.SLoRAScheduler",
        "vllm_slora.scheduler.SLoRAAsyncScheduler",
    )


@pytest.mark.parametrize(
    "slora, needle",
    [
        ({"no_such_key": 1}, "unknown slora config key 'no_such_key'"),
        ({"kernel_backend": "fast"}, "'kernel_backend' must be one of auto, native, torch, triton"),
        ({"host_cache_mb": -5}, "'host_cache_mb' must be a positive"),
    ],
)
def test_bad_slora_config_stops_startup(tiny_model, slora, needle):
    with pytest.raises(SLoRAConfigError, match=needle):
        _engine_config(tiny_model, enable_lora=True, additional_config={"slora": slora})


def test_slora_without_lora_enabled_is_refused(tiny_model):
    with pytest.raises(SLoRAConfigError, match="--enable-lora"):
        _engine_config(tiny_model, additional_config={"slora": {}})


@pytest.mark.engine
def test_serve_cli_reports_bad_slora_config(tiny_model):
    """`vllm serve` with a bad section exits non-zero and names the key."""
    cmd = [
        str(Path(sys.executable).with_name("vllm")), "serve", str(tiny_model),
        "--enable-lora", "--additional-config", '{"slora": {"hostcache": 3}}',
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode != 0
    assert "unknown slora config key 'hostcache'" in out.stdout + out.stderr


@pytest.mark.engine
def test_flag_present_runs_slora_classes_in_every_process(slora_llm, trace_file):
    events = trace.read(str(trace_file))
    loaded_in = {e["process"] for e in events if e["event"] == "plugin_loaded"}
    assert {"MainProcess", "EngineCore", "VllmWorker-0"} <= loaded_in
    schedulers = [e for e in events if e["event"] == "scheduler_init"]
    assert schedulers and all(e["process"] == "EngineCore" for e in schedulers)
    assert {e["cls"] for e in schedulers} <= {"SLoRAScheduler", "SLoRAAsyncScheduler"}
    # Other plugin engines of the session (servers, tiny-model engines) log here too.
    workers = [e for e in events if e["event"] == "worker_init"]
    assert workers and {e["cls"] for e in workers} == {"SLoRACPUWorker"}
    info = slora_llm.collective_rpc("slora_info")
    assert [i["worker_cls"] for i in info] == ["SLoRACPUWorker"]
    assert info[0]["slora_config"]["kernel_backend"] == "auto"


@pytest.mark.engine
def test_flag_absent_runs_stock_engine(tiny_model, tmp_path, monkeypatch):
    """Plugin installed and loaded everywhere, but nothing of it runs without the flag."""
    from vllm import SamplingParams

    from tests.engines import close_llm, make_llm

    stock_trace = tmp_path / "stock.jsonl"
    monkeypatch.setenv(trace.TRACE_ENV, str(stock_trace))
    llm = make_llm(tiny_model, slora=None, max_model_len=256, max_loras=4)
    try:
        out = llm.generate(["the quick brown fox"], SamplingParams(max_tokens=4, temperature=0))
        assert len(out[0].outputs[0].token_ids) == 4
        config = llm.llm_engine.vllm_config
        assert config.parallel_config.worker_cls == STOCK_WORKER
        assert config.scheduler_config.scheduler_cls is None
        with pytest.raises(Exception):  # noqa: B017  (whatever the RPC layer wraps it in)
            llm.collective_rpc("slora_info")  # stock workers do not have it
    finally:
        close_llm(llm)
    events = trace.read(str(stock_trace))
    assert {"EngineCore", "VllmWorker-0"} <= {e["process"] for e in events if e["event"] == "plugin_loaded"}
    assert not [e for e in events if e["event"] != "plugin_loaded"]



@pytest.mark.parametrize(
    "preset, finetune, expected",
    [({}, True, "0"), ({"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, True, "1"), ({}, False, None)],
    ids=["finetune", "user-reservation-kept", "no-finetune"],
)
def test_finetune_engine_gives_the_worker_every_core(tiny_model, monkeypatch, preset, finetune, expected):
    """A co-serving CPU engine keeps no core out of the worker's OpenMP team, unless the user
    said otherwise; it leaves vLLM's thread pinning alone (unpinned threads collapse when
    another process computes beside the server: 8 concurrent decodes 15 vs 80 tok/s here)."""
    from vllm_slora import activation
    from vllm_slora.config import SLoRAConfig

    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    for key, value in preset.items():
        monkeypatch.setenv(key, value)
    activation._cpu_cores_for_training(SLoRAConfig(finetune=finetune), _engine_config(tiny_model, enable_lora=True))
    assert os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU") == expected
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
