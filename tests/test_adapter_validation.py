"""Every way an adapter can be unservable is refused at registration with a clear AdapterError."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_slora.adapters import (
    AdapterError,
    AdapterNotFoundError,
    AdapterRegistry,
    BaseModelShape,
    generate_adapters,
    inspect_adapter,
    load_adapter_weights,
)

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)
BASE = BaseModelShape.from_hf_config(TINY_LLAMA)
PAGE_ELEMS = 1024
NAME = "bad-adapter"
PREFIX = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    return generate_adapters(TINY_LLAMA, tmp_path_factory.mktemp("good"), 1, ranks=(8,))[0].path


@pytest.fixture
def bad(tmp_path, good_adapter):
    """A fresh copy of a valid adapter, to be broken by the test."""
    path = str(tmp_path / NAME)
    shutil.copytree(good_adapter, path)
    return path


def weights_file(path):
    return os.path.join(path, "adapter_model.safetensors")


def edit_config(path, **changes):
    config_path = os.path.join(path, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(changes)
    with open(config_path, "w") as f:
        json.dump(config, f)


def edit_tensors(path, edit):
    tensors = load_file(weights_file(path))
    edit(tensors)
    save_file(tensors, weights_file(path))


def expect_error(path, match, base=BASE, **kwargs):
    with pytest.raises(AdapterError, match=match) as info:
        inspect_adapter(NAME, path, base, **kwargs)
    assert NAME in str(info.value) and info.value.adapter_name == NAME
    return info.value


def test_the_unbroken_copy_is_valid(bad):
    spec = inspect_adapter(NAME, bad, BASE, max_lora_rank=8, page_elems=PAGE_ELEMS, pool_blocks=100)
    assert spec.max_rank == 8


def test_rank_above_max_lora_rank(bad):
    expect_error(bad, "LoRA rank 8 is greater than max_lora_rank 4", max_lora_rank=4)


def test_rank_pattern_above_max_lora_rank(tmp_path):
    adapter = generate_adapters(TINY_LLAMA, tmp_path, 1, ranks=(4,), rank_pattern={"down_proj": 32})[0]
    with pytest.raises(AdapterError, match="LoRA rank 32 is greater than max_lora_rank 16"):
        inspect_adapter(adapter.name, adapter.path, BASE, max_lora_rank=16)


def test_missing_directory(tmp_path):
    expect_error(str(tmp_path / "nowhere"), "No adapter found for")


def test_missing_config(bad):
    os.remove(os.path.join(bad, "adapter_config.json"))
    expect_error(bad, "No adapter found for")


def test_config_not_json(bad):
    with open(os.path.join(bad, "adapter_config.json"), "w") as f:
        f.write("{not json")
    expect_error(bad, "adapter_config.json is not valid JSON")


def test_missing_weights(bad):
    os.remove(weights_file(bad))
    expect_error(bad, "no adapter_model.safetensors")


def test_truncated_weights(bad):
    size = os.path.getsize(weights_file(bad))
    with open(weights_file(bad), "r+b") as f:
        f.truncate(size - 100)
    expect_error(bad, "truncated: tensor data needs")


def test_trailing_garbage_after_weights(bad):
    with open(weights_file(bad), "ab") as f:
        f.write(b"\0" * 16)
    expect_error(bad, "unexpected bytes after the last tensor")


def test_corrupt_header_bytes(bad):
    with open(weights_file(bad), "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    expect_error(bad, "header is not valid JSON")


def test_impossible_header_length(bad):
    with open(weights_file(bad), "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))
    expect_error(bad, "header length")


def test_empty_weights_file(bad):
    open(weights_file(bad), "wb").close()
    expect_error(bad, "shorter than the 8-byte header")


def test_shapes_that_do_not_match_the_base_model(bad):
    wider = BaseModelShape.from_hf_config(dict(TINY_LLAMA, hidden_size=128))
    expect_error(bad, r"has shape \[8, 64\], expected \[8, 128\]", base=wider)


def test_config_rank_disagrees_with_tensors(bad):
    edit_config(bad, r=16)
    expect_error(bad, r"has shape \[8, 64\], expected \[16, 64\]")


def test_layer_beyond_the_base_model(bad):
    one_layer = BaseModelShape.from_hf_config(dict(TINY_LLAMA, num_hidden_layers=1))
    expect_error(bad, "is for layer 1, the base model has 1", base=one_layer)


@pytest.mark.parametrize(
    "targets, shown",
    [
        (["q_proj", "lm_head"], "lm_head"),
        (["embed_tokens", "v_proj"], "embed_tokens"),
        (["q_proj", "c_attn"], "c_attn"),
        (["input_layernorm"], "input_layernorm"),
        (r".*(q_proj|lm_head)", "lm_head"),
    ],
)
def test_unsupported_target_modules(bad, targets, shown):
    edit_config(bad, target_modules=targets)
    expect_error(bad, f"unsupported target module '{shown}'")


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens"], r".*(q_proj|lm_head)"])
def test_vocabulary_layer_refusal_says_why(bad, targets):
    edit_config(bad, target_modules=targets)
    message = str(expect_error(bad, "unsupported target module"))
    assert "LoRA on embed_tokens / lm_head (the vocabulary layers) is not served" in message, message
    assert "decoder layers' projections only" in message


def test_regex_targets_nothing_supported(bad):
    edit_config(bad, target_modules=r".*\.w_in")
    expect_error(bad, "matches none of")


def test_embedding_tensor_in_file(bad):
    edit_tensors(bad, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(8, 512)}))
    expect_error(bad, "unsupported module")


def test_dora_config(bad):
    edit_config(bad, use_dora=True)
    expect_error(bad, "DoRA")


def test_dora_magnitude_tensor(bad):
    edit_tensors(bad, lambda t: t.update({f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}))
    expect_error(bad, "DoRA")


def test_modules_to_save(bad):
    edit_config(bad, modules_to_save=["lm_head"])
    expect_error(bad, "modules_to_save")


def test_bias(bad):
    edit_config(bad, bias="lora_only")
    expect_error(bad, "bias 'lora_only' is not supported")


def test_bias_tensor(bad):
    edit_tensors(bad, lambda t: t.update({f"{PREFIX}.0.self_attn.q_proj.lora_B.bias": torch.ones(64)}))
    expect_error(bad, "bias tensor")


def test_not_lora(bad):
    edit_config(bad, peft_type="IA3")
    expect_error(bad, "peft_type 'IA3' is not supported")


def test_bad_rank_value(bad):
    edit_config(bad, r=0)
    expect_error(bad, "r must be a positive integer")


def test_key_outside_target_modules(bad):
    edit_config(bad, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    expect_error(bad, "down_proj.lora_A.weight does not belong to any target module")


def test_lora_b_missing(bad):
    edit_tensors(bad, lambda t: t.pop(f"{PREFIX}.1.mlp.up_proj.lora_B.weight"))
    expect_error(bad, "model.layers.1.mlp.up_proj has lora_A but its lora_B is missing")


def test_lora_a_missing(bad):
    edit_tensors(bad, lambda t: t.pop(f"{PREFIX}.0.self_attn.k_proj.lora_A.weight"))
    expect_error(bad, "lora_A is missing")


def test_target_without_weights(bad):
    def drop(t):
        t.pop(f"{PREFIX}.0.self_attn.o_proj.lora_A.weight")
        t.pop(f"{PREFIX}.0.self_attn.o_proj.lora_B.weight")

    edit_tensors(bad, drop)
    expect_error(bad, "o_proj is a target module but the checkpoint has no lora_A/lora_B")


def test_integer_tensor(bad):
    key = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
    edit_tensors(bad, lambda t: t.update({key: t[key].to(torch.int32)}))
    expect_error(bad, "dtype I32, expected a float type")


def test_adapter_larger_than_the_pool(bad):
    expect_error(bad, "needs 8 pool blocks but the whole pool has 4", page_elems=PAGE_ELEMS, pool_blocks=4)


def test_row_longer_than_a_page(bad):
    expect_error(bad, "does not fit a page", page_elems=32)


def test_pickle_only_is_refused_unless_allowed(bad):
    tensors = load_file(weights_file(bad))
    os.remove(weights_file(bad))
    torch.save(tensors, os.path.join(bad, "adapter_model.bin"))
    expect_error(bad, "pickle")
    spec = inspect_adapter(NAME, bad, BASE, allow_pickle=True)
    assert spec.checkpoint.format == "pickle" and spec.max_rank == 8
    weights = load_adapter_weights(spec)
    first = spec.layers[0][0]
    assert torch.equal(weights.layers[0][0].a, tensors[first.a_key])
    assert torch.equal(weights.layers[0][0].b, tensors[first.b_key])


def test_unreadable_pickle(bad):
    os.remove(weights_file(bad))
    with open(os.path.join(bad, "adapter_model.bin"), "wb") as f:
        f.write(b"definitely not a checkpoint")
    expect_error(bad, "adapter_model.bin could not be read as a PyTorch checkpoint", allow_pickle=True)


def test_failed_registration_leaves_registry_unchanged(bad, good_adapter):
    registry = AdapterRegistry(BASE, max_lora_rank=4)
    with pytest.raises(AdapterError, match="is greater than max_lora_rank"):
        registry.register(NAME, good_adapter)
    assert NAME not in registry and len(registry) == 0


# -- untrusted configs: bounded cost, adapter errors only (issue 9 C, D, E) ------------------

THIRTY_LAYERS = dict(TINY_LLAMA, num_hidden_layers=30)  # SmolLM2's layer count: 210 modules


@pytest.fixture(scope="module")
def thirty_layer_adapter(tmp_path_factory):
    return generate_adapters(THIRTY_LAYERS, tmp_path_factory.mktemp("thirty"), 1, ranks=(4,))[0].path


def _many_keys(n):
    # Keys that never match (each is tried against every module), then one that does.
    keys = {f"model.layers.{i % 30}.self_attn.q_proj_{i}": 16 for i in range(n)}
    keys["down_proj"] = 4
    return keys


def test_a_long_rank_pattern_costs_linear_time(tmp_path, thirty_layer_adapter):
    """600 keys (31 KB) took ~36 ms per key, 3 times over; now the whole check is cheap."""
    timings = {}
    for n in (300, 600):
        path = str(tmp_path / f"keys{n}")
        shutil.copytree(thirty_layer_adapter, path)
        edit_config(path, rank_pattern=_many_keys(n), alpha_pattern=_many_keys(n))
        start = time.perf_counter()
        spec = inspect_adapter(NAME, path, BaseModelShape.from_hf_config(THIRTY_LAYERS), max_lora_rank=64)
        timings[n] = time.perf_counter() - start
        assert spec.max_rank == 4
    assert timings[600] < 1.0, timings  # was ~20 s for these 210 modules
    assert timings[600] < 4 * timings[300] + 0.2, timings  # linear in the number of keys


def test_validation_runs_once_per_adapter_version(bad, monkeypatch):
    from vllm_slora.adapters import validation

    calls = []
    original = validation.parse_lora_config
    monkeypatch.setattr(validation, "parse_lora_config", lambda *a: calls.append(1) or original(*a))
    first = inspect_adapter(NAME, bad, BASE, max_lora_rank=8)
    assert inspect_adapter(NAME, bad, BASE, max_lora_rank=8) is first and len(calls) == 1
    edit_config(bad, lora_alpha=3)  # a new version of the files is checked again
    assert inspect_adapter(NAME, bad, BASE, max_lora_rank=8).layers[0][0].scaling == 3 / 8
    assert len(calls) == 2


# A regex that backtracks exponentially on module names in Python's `re` (each of these
# ran for hours before); and one that does in the `regex` package too.
SLOW_REGEXES = [r"(.|.)*Q", r"(.|.)*[0-9]{3}"]


def _inspect_in_subprocess(paths, timeout=120):
    """inspect_adapter on each path in a child process: [(message or None, seconds)].

    A child, because a hung regex holds the GIL: no in-process timeout could fire.
    """
    code = (
        "import sys, time, json\n"
        "from vllm_slora.adapters import AdapterError, BaseModelShape, inspect_adapter\n"
        f"base = BaseModelShape.from_hf_config({TINY_LLAMA!r})\n"
        "out = []\n"
        "for path in sys.argv[1:]:\n"
        "    start = time.perf_counter()\n"
        "    try:\n"
        f"        inspect_adapter({NAME!r}, path, base)\n"
        "        message = None\n"
        "    except AdapterError as e:\n"
        "        message = str(e)\n"
        "    out.append([message, time.perf_counter() - start])\n"
        "print(json.dumps(out))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=timeout,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_catastrophic_regexes_are_bounded(good_adapter, tmp_path):
    """`"target_modules": "(.|.)*Q"` hung the server; every regex of a config is bounded."""
    cases, paths = [], []
    for where in ("target_modules", "rank_pattern", "alpha_pattern", "layers_pattern"):
        for i, pattern in enumerate(SLOW_REGEXES):
            path = str(tmp_path / f"{where}-{i}")
            shutil.copytree(good_adapter, path)
            changes = {
                "target_modules": {"target_modules": pattern},
                "rank_pattern": {"rank_pattern": {pattern: 8}},
                "alpha_pattern": {"alpha_pattern": {pattern: 16}},
                "layers_pattern": {"layers_pattern": pattern, "layers_to_transform": [0, 1]},
            }[where]
            edit_config(path, **changes)
            cases.append((where, pattern))
            paths.append(path)
    for (where, pattern), (message, seconds) in zip(cases, _inspect_in_subprocess(paths)):
        # Hours before; the budget is 1 s of matching, the rest is margin for a loaded machine.
        assert seconds < 30, (where, pattern, seconds)
        if message is not None:  # refused in time, or the pattern matched nothing: an AdapterError
            assert NAME in message and any(
                s in message for s in ("takes too long", "matches none", "targets no module", "does not belong")
            ), message


def test_pattern_matching_is_peft_s(bad):
    """Same first-match suffix rule as peft.utils.other.get_pattern_key, regexes included."""
    peft_other = pytest.importorskip("peft.utils.other")
    from vllm_slora.adapters import parse_lora_config
    from vllm_slora.adapters.modules import module_name

    patterns = {r"layers\.1\.mlp\.down_proj": 2, "q_proj": 3, r"(k|v)_proj": 5, "self_attn.o_proj": 6,
                r".*\.1\..*up_proj": 7, "model.layers.0.mlp.gate_proj": 9, "proj": 11}
    params = parse_lora_config(NAME, {"r": 4, "target_modules": "all-linear", "rank_pattern": patterns})
    for layer in range(3):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            module = module_name(layer, proj)
            expected = patterns.get(peft_other.get_pattern_key(list(patterns), module), 4)
            assert params.rank_for(module) == expected, module


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(layers_pattern="layers(", layers_to_transform=[0]), r"layers_pattern 'layers\(' is not a valid regex"),
        (dict(layers_pattern=7, layers_to_transform=[0]), "layers_pattern must be a regex"),
        (dict(layers_to_transform="0,1"), "layers_to_transform must be a layer index"),
        (dict(rank_pattern=["q_proj", 8]), "rank_pattern must be a JSON object"),
        (dict(rank_pattern="q_proj=8"), "rank_pattern must be a JSON object"),
        (dict(alpha_pattern=[["q_proj", 8]]), "alpha_pattern must be a JSON object"),
        (dict(rank_pattern={"q_proj": "8"}), r"rank_pattern\['q_proj'\] must be a positive integer"),
        (dict(alpha_pattern={"q_proj": None}), r"alpha_pattern\['q_proj'\] must be a finite number"),
        (dict(rank_pattern={"q_proj)": 8}), "rank_pattern key 'q_proj\\)' is not a valid regex"),
        (dict(target_modules="x" * 2000), "longer than 1024 characters"),
        (dict(target_modules=[1, 2]), "target_modules must be a non-empty list"),
    ],
)
def test_malformed_config_values_are_adapter_errors(bad, changes, needle):
    edit_config(bad, **changes)
    expect_error(bad, needle)


def test_config_that_is_not_an_object(bad):
    with open(os.path.join(bad, "adapter_config.json"), "w") as f:
        f.write("[1, 2]")
    expect_error(bad, "must hold a JSON object")


def test_non_finite_and_absurd_scalings(bad):
    edit_config(bad, lora_alpha=float("nan"))  # json writes NaN, json.load reads it
    expect_error(bad, "lora_alpha must be a finite number")
    edit_config(bad, lora_alpha=1e6)  # scaling 125000
    expect_error(bad, r"scaling 125000 of model.layers.0.self_attn.q_proj .* is outside \[-10000, 10000\]")
    edit_config(bad, lora_alpha=16, alpha_pattern={"down_proj": float("inf")})
    expect_error(bad, r"alpha_pattern\['down_proj'\] must be a finite number")
    edit_config(bad, lora_alpha=-16, alpha_pattern={})  # negative alpha (LoRA negation) is PEFT-valid
    assert inspect_adapter(NAME, bad, BASE).layers[0][0].scaling == -2.0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_non_finite_weights_are_refused_when_read(bad, value):
    from vllm_slora.adapters import check_adapter_weights

    key = f"{PREFIX}.1.mlp.down_proj.lora_B.weight"

    def poison(t):
        t[key][3, 1] = value

    edit_tensors(bad, poison)
    spec = inspect_adapter(NAME, bad, BASE)  # the header is fine
    dtype = torch.float16 if value == 1e30 else torch.float32  # 1e30 only overflows fp16
    problem = "overflows torch.float16" if value == 1e30 else "holds NaN or Inf values"
    for check in (lambda: check_adapter_weights(spec, dtype), lambda: load_adapter_weights(spec, dtype=dtype)):
        with pytest.raises(AdapterError, match=f"{NAME}.*tensor {key} {problem}"):
            check()
    if value == 1e30:
        check_adapter_weights(spec, torch.float32)  # fine in fp32


def test_messages_do_not_reveal_other_files(bad, tmp_path):
    # A path that exists but is no adapter reads exactly like one that does not exist.
    (tmp_path / "some-dir").mkdir()
    exists = expect_error(str(tmp_path / "some-dir"), "No adapter found for")
    missing = expect_error(str(tmp_path / "no-dir"), "No adapter found for")
    assert str(exists).replace("some-dir", "X") == str(missing).replace("no-dir", "X")
    assert isinstance(exists, AdapterNotFoundError)
    # A weight file that is a symlink elsewhere: the message states no size of it.
    target = tmp_path / "secret"
    target.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 37)
    os.remove(weights_file(bad))
    os.symlink(target, weights_file(bad))
    error = expect_error(bad, "adapter_model.safetensors is corrupt or truncated")
    assert str(target.stat().st_size) not in str(error) and "root" not in str(error)


def test_unforeseen_failures_are_adapter_errors(bad, monkeypatch):
    from vllm_slora.adapters import validation

    def boom(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(validation, "_check_targets", boom)
    expect_error(bad, "could not be validated")


def test_header_entry_with_wrong_types(bad):
    with open(weights_file(bad), "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        data = f.read()
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = ["0", "8"]
    raw = json.dumps(header).encode()
    with open(weights_file(bad), "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)
    expect_error(bad, "malformed header entry")
