"""Adapters by name from `adapter_dirs`, and serving that does not depend on files staying put.

Issue #9 items 8 and 3: the plugin serves what vLLM's filesystem resolver serves without
VLLM_PLUGINS (which would switch the plugin off) or VLLM_ALLOW_RUNTIME_LORA_UPDATING;
adapters are checked at first sight and at explicit reloads only, so a loaded adapter
keeps serving when its directory is moved or deleted (as in stock vLLM).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)


# -- config ------------------------------------------------------------------------------


def test_adapter_dirs_key_takes_a_list_and_stays_hashable():
    from vllm_slora.config import SLoRAConfig, SLoRAConfigError

    config = SLoRAConfig.from_additional_config({"slora": {"adapter_dirs": ["/a", "b"]}})
    assert config.adapter_dirs == ("/a", "b") and hash(config) == hash(SLoRAConfig(adapter_dirs=("/a", "b")))
    assert SLoRAConfig().adapter_dirs == ()
    for bad in ("/a", ["/a", 3], [""], {"dir": "/a"}):
        with pytest.raises(SLoRAConfigError, match="'adapter_dirs' must be a list of directory paths"):
            SLoRAConfig.from_dict({"adapter_dirs": bad})


def test_adapter_dirs_must_exist_and_need_one_api_server(tmp_path):
    from vllm_slora.activation import _check_adapter_dirs
    from vllm_slora.config import SLoRAConfig, SLoRAConfigError

    one = SimpleNamespace(_api_process_count=1)
    _check_adapter_dirs(SLoRAConfig(adapter_dirs=(str(tmp_path),)), one)
    with pytest.raises(SLoRAConfigError, match="is not a directory"):
        _check_adapter_dirs(SLoRAConfig(adapter_dirs=(str(tmp_path / "nowhere"),)), one)
    with pytest.raises(SLoRAConfigError, match="single API server"):
        _check_adapter_dirs(SLoRAConfig(adapter_dirs=(str(tmp_path),)), SimpleNamespace(_api_process_count=2))
    _check_adapter_dirs(SLoRAConfig(), SimpleNamespace(_api_process_count=2))  # without the key: as before


# -- finding adapters by name ------------------------------------------------------------


def _fake_adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"x")
    return path


def test_names_resolve_inside_the_directories_only(tmp_path):
    from vllm_slora.adapter_sources import AdapterDirectories, AdapterSourceError

    first, second, outside = tmp_path / "first", tmp_path / "second", tmp_path / "outside"
    for d in (first, second):
        d.mkdir()
    _fake_adapter(first / "both")
    _fake_adapter(second / "both")
    _fake_adapter(second / "org" / "nested")
    _fake_adapter(outside / "secret")
    (second / "link-out").symlink_to(outside / "secret")
    (second / "link-in").symlink_to(second / "both")
    files_out = _fake_adapter(second / "files-out")
    (files_out / "adapter_model.safetensors").unlink()
    (files_out / "adapter_model.safetensors").symlink_to(outside / "secret" / "adapter_model.safetensors")
    (second / "no-config").mkdir()
    sources = AdapterDirectories((str(first), str(second)))

    assert sources.locate("both") == str(first / "both")  # the first directory that has it
    assert sources.locate("org/nested") == str(second / "org" / "nested")
    assert sources.locate("link-in") == str(second / "both")  # a link inside: its real path
    assert sources.locate("missing") is None and sources.locate("no-config") is None
    refused = {
        "../outside/secret": "relative path inside adapter_dirs",
        str(outside / "secret"): "relative path inside adapter_dirs",
        "org//nested": "relative path inside adapter_dirs",
        "./both": "relative path inside adapter_dirs",
        "both\x00": "NUL byte",
        "link-out": "leading outside its directory",
        "files-out": "leading outside its directory",
    }
    for name, needle in refused.items():
        with pytest.raises(AdapterSourceError, match=needle) as err:
            sources.locate(name)
        assert str(outside) not in str(err.value) or name.startswith("/")  # never where a link points


def test_check_model_loads_from_dirs_without_env_switches(tmp_path, monkeypatch):
    """The patched BaseServing._check_model finds a new name in adapter_dirs and loads it
    through load_lora_adapter, with VLLM_ALLOW_RUNTIME_LORA_UPDATING unset; 400 for escapes."""
    from vllm_slora.compat import BaseServing
    from vllm_slora.patches import patch_engine_serving

    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    monkeypatch.setattr(BaseServing, "_check_model", BaseServing._check_model)  # restored after the test
    patch_engine_serving.apply()
    patch_engine_serving.apply()  # idempotent
    _fake_adapter(tmp_path / "found")
    loads = []

    class Models:
        engine_client = SimpleNamespace(vllm_config=SimpleNamespace(
            additional_config={"slora": {"adapter_dirs": [str(tmp_path)]}}))
        base_model_paths = [SimpleNamespace(name="base")]

        def __init__(self):
            self.lora_requests = {}

        def is_base_model(self, name):
            return name == "base"

        async def load_lora_adapter(self, request, base_model_name=None):
            loads.append((request.lora_name, request.lora_path))
            self.lora_requests[request.lora_name] = request
            return "Success"

    serving = BaseServing(Models(), model_config=None)

    def check(name):
        return asyncio.run(serving._check_model(SimpleNamespace(model=name)))

    async def twice(name):  # concurrent first requests of one name: one load
        return await asyncio.gather(serving._check_model(SimpleNamespace(model=name)),
                                    serving._check_model(SimpleNamespace(model=name)))

    assert asyncio.run(twice("found")) == [None, None]
    assert loads == [("found", str(tmp_path / "found"))]
    assert check("found") is None and check("base") is None and len(loads) == 1
    missing = check("missing")
    assert missing.error.code == 404 and "does not exist" in missing.error.message  # stock's answer
    escape = check("../etc")
    assert escape.error.code == 400 and "relative path inside adapter_dirs" in escape.error.message
    assert len(loads) == 1


# -- checking files at load only ---------------------------------------------------------


class _Config:
    """The parts of a VllmConfig the validator reads (weak-referenceable, unlike SimpleNamespace)."""

    def __init__(self, max_lora_rank=8):
        import torch

        self.additional_config = {"slora": {}}
        self.model_config = SimpleNamespace(hf_config=SimpleNamespace(to_dict=lambda: dict(TINY)),
                                            dtype=torch.float32)
        self.lora_config = SimpleNamespace(max_lora_rank=max_lora_rank)
        self.parallel_config = SimpleNamespace(tensor_parallel_size=1)
        self.cache_config = SimpleNamespace(num_gpu_blocks=None)


@pytest.fixture
def disk_access(monkeypatch):
    """Counts every stat / open of a file while `counting` is set."""
    import builtins

    calls: list[str] = []
    counting = {"on": False}

    def counted(fn):
        def wrapper(*args, **kwargs):
            if counting["on"]:
                calls.append(f"{fn.__name__}({args[0]!r})")
            return fn(*args, **kwargs)

        return wrapper

    for module, name in ((os, "stat"), (os, "lstat"), (os, "open"), (builtins, "open")):
        monkeypatch.setattr(module, name, counted(getattr(module, name)))
    return calls, counting


def test_a_checked_adapter_costs_no_file_access(tmp_path, disk_access):
    from vllm.lora.request import LoRARequest

    from vllm_slora.adapters.generate import generate_adapters
    from vllm_slora.config import SLoRAConfig
    from vllm_slora.frontend_validation import AdapterValidator

    calls, counting = disk_access
    (good,) = generate_adapters(TINY, tmp_path / "v1", 1, ranks=(4,), seed=1)
    validator = AdapterValidator(_Config(), SLoRAConfig())
    assert validator.problem(LoRARequest("a", 1, good.path)) is None  # first sight: read

    counting["on"] = True
    assert validator.problem(LoRARequest("a", 1, good.path)) is None  # a later request
    inplace = LoRARequest("a", 1, good.path, load_inplace=True)
    validator.accept(inplace)  # what the server's load does after its own check
    assert validator.problem(inplace) is None  # the server's reused load_inplace object
    assert calls == []
    moved = tmp_path / "moved"
    Path(good.path).rename(moved)
    assert validator.problem(LoRARequest("a", 1, good.path)) is None  # files gone: still servable
    assert calls == []

    # An explicit reload (or a new object asking for load_inplace) looks at the files again.
    counting["on"] = False
    gone = validator.problem(SimpleNamespace(lora_name="a", lora_path=good.path), reload=True)
    assert gone is not None and "No adapter found for" in str(gone)
    assert "No adapter found for" in str(validator.problem(LoRARequest("a", 1, good.path)))  # unchecked again
    moved.rename(good.path)
    assert validator.problem(LoRARequest("a", 1, good.path, load_inplace=True)) is None


def test_an_explicit_reload_of_changed_files_is_checked_again(tmp_path):
    from vllm.lora.request import LoRARequest

    from vllm_slora.adapters.generate import generate_adapters
    from vllm_slora.config import SLoRAConfig
    from vllm_slora.frontend_validation import AdapterValidator

    (good,) = generate_adapters(TINY, tmp_path / "good", 1, ranks=(4,), seed=1)
    (big,) = generate_adapters(TINY, tmp_path / "big", 1, ranks=(16,), seed=2)  # > max_lora_rank 8
    validator = AdapterValidator(_Config(), SLoRAConfig())
    served = tmp_path / "served"
    shutil.copytree(good.path, served)
    assert validator.problem(LoRARequest("a", 1, str(served))) is None
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.replace(shutil.copy(Path(big.path) / name, tmp_path / name), served / name)
    assert validator.problem(LoRARequest("a", 1, str(served))) is None  # no reload asked: not read
    probe = SimpleNamespace(lora_name="a", lora_path=str(served))
    assert "is greater than max_lora_rank 8" in str(validator.problem(probe, reload=True))
    assert "is greater than max_lora_rank 8" in str(validator.problem(LoRARequest("a", 1, str(served))))
    fresh = LoRARequest("a", 1, str(served), load_inplace=True)  # offline: a new reload request
    assert "is greater than max_lora_rank 8" in str(validator.problem(fresh))


def test_validators_go_with_their_config():
    import gc

    from vllm_slora import frontend_validation

    config = _Config()
    validator = frontend_validation.validator_for(config)
    assert validator is not None and frontend_validation.validator_for(config) is validator
    key = id(config)
    del config, validator
    gc.collect()
    assert key not in frontend_validation._validators


# -- the OpenAI server -------------------------------------------------------------------


def _server_args(tiny_model, slora: dict, *extra: str) -> list[str]:
    return [
        "--served-model-name", "base", "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
        "--kv-cache-memory-bytes", str(256 << 20), "--enable-lora", "--max-lora-rank", "8",
        "--additional-config", json.dumps({"slora": slora}), *extra,
    ]


def _complete(base_url: str, model: str) -> tuple[int, str]:
    import httpx

    resp = httpx.post(f"{base_url}/v1/completions", timeout=60, json={
        "model": model, "prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0.0,
        "return_token_ids": True,
    })
    if resp.status_code != 200:
        return resp.status_code, resp.json()["error"]["message"]
    return 200, json.dumps(resp.json()["choices"][0]["token_ids"])


def _load(base_url: str, name: str, path, inplace: bool = False):
    import httpx

    return httpx.post(f"{base_url}/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": name, "lora_path": str(path), "load_inplace": inplace})


@pytest.fixture(scope="module")
def adapters_root(tiny_model, tmp_path_factory):
    from vllm_slora.adapters.generate import generate_adapters

    root = tmp_path_factory.mktemp("sources")
    for d in ("dirs1", "dirs2", "static", "outside", "stock"):
        (root / d).mkdir()
    generate_adapters(tiny_model / "config.json", root / "dirs2", 2, ranks=(4, 8), seed=11, name_prefix="dir")
    generate_adapters(tiny_model / "config.json", root / "static", 1, ranks=(8,), seed=12, name_prefix="static")
    generate_adapters(tiny_model / "config.json", root / "outside", 1, ranks=(4,), seed=13, name_prefix="out")
    generate_adapters(tiny_model / "config.json", root / "dirs1", 1, ranks=(16,), seed=14, name_prefix="toobig")
    generate_adapters(tiny_model / "config.json", root / "stock", 1, ranks=(4,), seed=15, name_prefix="stock")
    (root / "dirs1" / "escape").symlink_to(root / "outside" / "out-0000")
    return root


@pytest.fixture(scope="module")
def plain_server(tiny_model, adapters_root):
    """adapter_dirs and nothing else: no VLLM_PLUGINS, no VLLM_ALLOW_RUNTIME_LORA_UPDATING."""
    from vllm_slora.server_process import ServerProcess

    root = adapters_root
    args = _server_args(tiny_model, {"adapter_dirs": [str(root / "dirs1"), str(root / "dirs2")]},
                        "--lora-modules", f"static={root / 'static' / 'static-0000'}")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")}
    server = ServerProcess(tiny_model, args)
    server.env = env
    with server:
        yield server


@pytest.mark.engine
def test_adapter_dirs_serve_by_name_with_no_switches(plain_server, adapters_root):
    import httpx

    url = plain_server.base_url
    assert "vllm-slora: active for this engine" in plain_server.log_path.read_text()  # the line to look for
    assert httpx.post(f"{url}/v1/load_lora_adapter", json={}).status_code == 404  # endpoints stay closed
    status, tokens = _complete(url, "dir-0001")  # in the second directory
    assert status == 200 and json.loads(tokens)
    assert "dir-0001" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    status, message = _complete(url, "nothing-here")
    assert status == 404 and "The model `nothing-here` does not exist" in message
    status, message = _complete(url, "../outside/out-0000")
    assert status == 400 and "relative path inside adapter_dirs" in message
    status, message = _complete(url, "escape")
    assert status == 400 and "leading outside its directory" in message
    status, message = _complete(url, "toobig-0000")
    assert status == 400 and "'toobig-0000'" in message and "is greater than max_lora_rank 8" in message
    assert _complete(url, "base")[0] == 200


@pytest.mark.engine
def test_moved_adapters_keep_serving_the_same_tokens(plain_server, adapters_root, tmp_path):
    url = plain_server.base_url
    before = {name: _complete(url, name) for name in ("static", "dir-0000")}
    assert all(status == 200 for status, _ in before.values()), before
    shutil.move(adapters_root / "static", tmp_path / "static")
    shutil.move(adapters_root / "dirs2" / "dir-0000", tmp_path / "dir-0000")
    try:
        for _ in range(2):
            assert {name: _complete(url, name) for name in before} == before
    finally:
        shutil.move(tmp_path / "static", adapters_root / "static")
        shutil.move(tmp_path / "dir-0000", adapters_root / "dirs2" / "dir-0000")


@pytest.fixture(scope="module")
def switched_server(tiny_model, adapters_root):
    """VLLM_PLUGINS naming slora and vLLM's filesystem resolver, runtime updating on."""
    from vllm_slora.server_process import ServerProcess

    args = _server_args(tiny_model, {"adapter_dirs": [str(adapters_root / "dirs2")]})
    env = {"VLLM_PLUGINS": "slora,lora_filesystem_resolver", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
           "VLLM_LORA_RESOLVER_CACHE_DIR": str(adapters_root / "stock")}
    with ServerProcess(tiny_model, args, env=env) as server:
        yield server


@pytest.mark.engine
def test_plugin_and_vllm_resolver_both_work_when_named(switched_server):
    url = switched_server.base_url
    assert _complete(url, "dir-0001")[0] == 200  # adapter_dirs: only the plugin does this
    assert _complete(url, "stock-0000")[0] == 200  # vLLM's lora_filesystem_resolver


@pytest.mark.engine
def test_explicit_reload_checks_the_files_again(switched_server, tiny_model, tmp_path):
    from vllm_slora.adapters.generate import generate_adapters

    url = switched_server.base_url
    (first,) = generate_adapters(tiny_model / "config.json", tmp_path / "first", 1, ranks=(4,), seed=21)
    (second,) = generate_adapters(tiny_model / "config.json", tmp_path / "second", 1, ranks=(8,), seed=22)
    (big,) = generate_adapters(tiny_model / "config.json", tmp_path / "big", 1, ranks=(16,), seed=23)
    served = tmp_path / "served"
    shutil.copytree(first.path, served)

    def replace_files(source):
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            os.replace(shutil.copy(Path(source) / name, tmp_path / name), served / name)

    assert _load(url, "reloaded", served).status_code == 200
    status, old_tokens = _complete(url, "reloaded")
    assert status == 200
    replace_files(big.path)
    resp = _load(url, "reloaded", served, inplace=True)
    assert resp.status_code == 400 and "is greater than max_lora_rank 8" in resp.json()["error"]["message"]
    status, message = _complete(url, "reloaded")
    assert status == 400 and "is greater than max_lora_rank 8" in message
    replace_files(second.path)
    assert _load(url, "reloaded", served, inplace=True).status_code == 200
    status, new_tokens = _complete(url, "reloaded")
    assert status == 200 and _complete(url, "reloaded") == (200, new_tokens)
