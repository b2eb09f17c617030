"""Every way an adapter can be unservable is refused at registration with a clear AdapterError."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_slora.adapters import AdapterError, AdapterRegistry, BaseModelShape, generate_adapters, inspect_adapter
from vllm_slora.adapters import load_adapter_weights

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
    expect_error(bad, "rank 8 is above max_lora_rank 4", max_lora_rank=4)


def test_rank_pattern_above_max_lora_rank(tmp_path):
    adapter = generate_adapters(TINY_LLAMA, tmp_path, 1, ranks=(4,), rank_pattern={"down_proj": 32})[0]
    with pytest.raises(AdapterError, match="rank 32 is above max_lora_rank 16"):
        inspect_adapter(adapter.name, adapter.path, BASE, max_lora_rank=16)


def test_missing_directory(tmp_path):
    expect_error(str(tmp_path / "nowhere"), "does not exist")


def test_missing_config(bad):
    os.remove(os.path.join(bad, "adapter_config.json"))
    expect_error(bad, "missing adapter_config.json")


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
    expect_error(bad, "16 unexpected bytes")


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
    expect_error(bad, "less than the 8-byte header")


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
    expect_error(bad, "adapter_model.bin could not be read", allow_pickle=True)


def test_failed_registration_leaves_registry_unchanged(bad, good_adapter):
    registry = AdapterRegistry(BASE, max_lora_rank=4)
    with pytest.raises(AdapterError, match="above max_lora_rank"):
        registry.register(NAME, good_adapter)
    assert NAME not in registry and len(registry) == 0
