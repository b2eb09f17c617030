"""vllm-slora behind vLLM's OpenAI server: adapters by name, bad adapters get a 4xx (stock's codes)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.bad_adapters import STATUS, make_bad_adapters, make_model_bad_adapters

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(default_model, default_adapters):
    from vllm_slora.server_process import ServerProcess

    args = [
        "--served-model-name", "base", "--dtype", "float32", "--max-model-len", "512",
        "--kv-cache-memory-bytes", str(1024 << 20), "--enable-lora", "--max-lora-rank", "64",
        "--lora-modules", *[f"{a.name}={a.path}" for a in default_adapters],
        "--additional-config", json.dumps({"slora": {}}),
    ]
    with ServerProcess(default_model, args, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}) as srv:
        yield srv


async def _chat(client, model):
    out = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0.0
    )
    return out.choices[0].message.content


async def _load(base_url, name, path):
    import httpx

    async with httpx.AsyncClient(timeout=60) as http:
        return await http.post(f"{base_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def test_bad_adapters_get_4xx_while_good_requests_succeed(server, default_model, default_adapters, tmp_path):
    from openai import AsyncOpenAI

    bad = make_bad_adapters(default_adapters[0].path, tmp_path)
    bad.update(make_model_bad_adapters(default_model / "config.json", tmp_path))

    async def scenario():
        client = AsyncOpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
        good = [_chat(client, a.name) for a in default_adapters] + [_chat(client, "base")]
        loads = [_load(server.base_url, f"bad-{case}", path) for case, (path, _) in bad.items()]
        results = await asyncio.gather(*good, *loads)
        await client.close()
        return results[: len(good)], results[len(good):]

    answers, responses = asyncio.run(scenario())
    assert all(isinstance(a, str) and a for a in answers)
    for (case, (path, needle)), resp in zip(bad.items(), responses):
        assert resp.status_code == STATUS.get(case, 400), f"{case}: {resp.status_code} {resp.text}"
        message = resp.json()["error"]["message"]
        assert f"bad-{case}" in message and needle in message, message
        if case == "symlink_elsewhere":  # nothing about the file behind the link
            target = (path / "adapter_model.safetensors").resolve()
            assert str(target.stat().st_size) not in message and str(target) not in message, message


def test_good_adapter_loads_at_runtime_and_serves(server, default_model, tmp_path):
    from openai import OpenAI

    from vllm_slora.adapters.generate import generate_adapters

    # 600 rank_pattern keys (31 KB; issue 9 C: stalled all traffic for 111 s) load at once.
    keys = {f"model.layers.{i % 30}.self_attn.q_proj_{i}": 16 for i in range(600)}
    (extra,) = generate_adapters(default_model / "config.json", tmp_path, 1, ranks=(4,), seed=77, name_prefix="late",
                                 rank_pattern=keys)
    start = time.perf_counter()
    resp = asyncio.run(_load(server.base_url, extra.name, extra.path))
    assert resp.status_code == 200, resp.text
    assert time.perf_counter() - start < 10
    client = OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
    assert extra.name in {m.id for m in client.models.list().data}
    out = client.completions.create(model=extra.name, prompt="Hello", max_tokens=4, temperature=0.0)
    assert out.choices[0].text
