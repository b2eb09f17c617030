"""Server arguments per compared system."""

import json

import pytest

from vllm_slora.bench.systems import AdapterRef, ServerSettings, engine_kwargs, server_args, vllm_max_lora_rank

ADAPTERS = [AdapterRef(f"adapter-{i:04d}", f"/a/{i}", r) for i, r in enumerate([8, 16, 32, 64, 8])]


def _flag(args, name):
    return args[args.index(name) + 1]


def test_max_lora_rank_rounds_up_to_what_vllm_accepts():
    assert vllm_max_lora_rank([8, 16]) == 16
    assert vllm_max_lora_rank([12]) == 16
    assert vllm_max_lora_rank([4]) == 8
    with pytest.raises(ValueError):
        vllm_max_lora_rank([1024])


def test_base_has_no_lora_flags():
    args = server_args("base", ADAPTERS, ServerSettings())
    assert "--enable-lora" not in args and "--lora-modules" not in args
    assert _flag(args, "--max-model-len") == "512"


def test_stock_and_slora_differ_only_in_the_lora_machinery():
    settings = ServerSettings(max_loras=2, extra_args=("--enforce-eager",))
    stock = server_args("stock", ADAPTERS, settings)
    slora = server_args("slora", ADAPTERS, settings)
    assert _flag(stock, "--max-lora-rank") == _flag(slora, "--max-lora-rank") == "64"
    assert _flag(stock, "--max-loras") == "2" and _flag(stock, "--max-cpu-loras") == "5"
    assert "--max-loras" not in slora  # no slot cap unless the user asks (DESIGN §3)
    assert json.loads(_flag(slora, "--additional-config")) == {"slora": {}}
    assert "adapter-0003=/a/3" in stock and "adapter-0003=/a/3" in slora
    assert "--enforce-eager" in stock and "--enforce-eager" in slora
    with pytest.raises(ValueError):
        server_args("nope", ADAPTERS, settings)


def test_engine_kwargs_mirror_server_args():
    kw = engine_kwargs("stock", ADAPTERS[:1], ServerSettings(max_loras=8))
    assert kw["enable_lora"] and kw["max_loras"] == 1 and kw["max_cpu_loras"] == 1 and kw["max_lora_rank"] == 8
    assert engine_kwargs("slora", ADAPTERS, ServerSettings())["additional_config"] == {"slora": {}}
    assert "enable_lora" not in engine_kwargs("base", ADAPTERS, ServerSettings())
