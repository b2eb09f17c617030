"""AdapterSpec: per-module rank/scaling (checked against PEFT), pages, TP shapes, loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_slora.adapters import (
    SLICE_ORDER,
    AdapterRegistry,
    BaseModelShape,
    generate_adapters,
    inspect_adapter,
    load_adapter_weights,
)
from vllm_slora.adapters._layout import dense_pages, plan_layout
from vllm_slora.adapters.modules import module_name

TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)
BASE = BaseModelShape.from_hf_config(TINY_LLAMA)
# One KV block of 16 tokens in one layer: 16 tokens x (K, V) x 2 kv heads x head_dim 16.
PAGE_ELEMS = 16 * 2 * 2 * 16


def peft_ranks_and_scalings(adapter_dir):
    """{module name: (r, scaling)} as PEFT itself builds them from the adapter."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = PeftModel.from_pretrained(LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)), adapter_dir)
    found = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "r") and isinstance(module.r, dict) and "default" in module.r:
            found[name] = (module.r["default"], module.scaling["default"])
    return found


def ours(spec):
    return {
        module_name(layer, s.projection): (s.rank, s.scaling)
        for layer, slices in enumerate(spec.layers)
        for s in slices
        if s.rank
    }


def assert_same_modules(ours_map, peft_map):
    assert sorted(ours_map) == sorted(peft_map)
    for module, (rank, scaling) in peft_map.items():
        assert ours_map[module][0] == rank, module
        assert ours_map[module][1] == pytest.approx(scaling, rel=1e-12), module


def rewrite_config(adapter_dir, **changes):
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize(
    "settings",
    [
        dict(ranks=(8,), lora_alpha=16),
        dict(ranks=(8,), use_rslora=True, lora_alpha=16),
        dict(
            ranks=(8,),
            lora_alpha=16,
            rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 12},
            alpha_pattern={"v_proj": 3, r"layers\.0\..*up_proj": 7},
        ),
        dict(ranks=(6,), use_rslora=True, rank_pattern={r"model\.layers\.1\.self_attn\.(k|o)_proj": 2},
             alpha_pattern={"gate_proj": 5}, target_modules=("k_proj", "o_proj", "gate_proj", "down_proj")),
    ],
    ids=["plain", "rslora", "patterns", "rslora-patterns-subset"],
)
def test_ranks_and_scalings_match_peft(tmp_path, settings):
    adapter = generate_adapters(TINY_LLAMA, tmp_path, 1, **settings)[0]
    spec = inspect_adapter(adapter.name, adapter.path, BASE, max_lora_rank=64)
    assert_same_modules(ours(spec), peft_ranks_and_scalings(adapter.path))


def test_regex_target_modules_and_layers_to_transform_match_peft(tmp_path):
    regex_adapter, layer_adapter = generate_adapters(
        TINY_LLAMA, tmp_path, 2, ranks=(4, 8), target_modules=("q_proj", "v_proj"))
    rewrite_config(regex_adapter.path, target_modules=r".*layers\.\d+\.self_attn\.(q|v)_proj")
    spec = inspect_adapter("regex", regex_adapter.path, BASE)
    assert_same_modules(ours(spec), peft_ranks_and_scalings(regex_adapter.path))

    # Keep only layer 1, as PEFT would have saved with layers_to_transform=[1].
    rewrite_config(layer_adapter.path, layers_to_transform=[1])
    weights = os.path.join(layer_adapter.path, "adapter_model.safetensors")
    save_file({k: v for k, v in load_file(weights).items() if ".layers.1." in k}, weights)
    spec = inspect_adapter("layers", layer_adapter.path, BASE)
    assert spec.ranks()[0].tolist() == [0] * 7
    assert_same_modules(ours(spec), peft_ranks_and_scalings(layer_adapter.path))


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    adapters = generate_adapters(TINY_LLAMA, out, 5, ranks=(8, 16, 32, 64, 5))
    return [inspect_adapter(a.name, a.path, BASE, max_lora_rank=64) for a in adapters]


@pytest.mark.parametrize("page_elems", [PAGE_ELEMS, 4 * PAGE_ELEMS, 640])
def test_blocks_needed_is_plan_layout_pages_and_near_dense(specs, page_elems):
    for spec in specs:
        matrices = spec.layer_matrices(0)
        assert [m.rows for m in matrices[::2]] == [spec.max_rank] * 7
        assert spec.blocks_needed(page_elems) == plan_layout(matrices, page_elems).num_pages
        dense = dense_pages(matrices, page_elems)
        assert spec.dense_blocks(page_elems) == dense
        # Rows never straddle pages: at most one partial row lost per matrix.
        max_waste = sum(m.row_len for m in matrices)
        assert dense <= spec.blocks_needed(page_elems) <= dense + -(-max_waste // page_elems)
        assert spec.blocks_needed(page_elems) <= dense + 3


def test_blocks_scale_with_rank_not_max_rank(specs):
    blocks = [spec.blocks_needed(PAGE_ELEMS) for spec in specs[:4]]  # ranks 8, 16, 32, 64
    assert blocks == sorted(blocks)
    assert blocks[3] >= 7 * blocks[0]  # rank 8 costs ~1/8 of rank 64


def test_blocks_needed_is_max_over_layers(tmp_path):
    adapter = generate_adapters(TINY_LLAMA, tmp_path, 1, ranks=(4,), rank_pattern={"layers.1.mlp.up_proj": 48})[0]
    spec = inspect_adapter(adapter.name, adapter.path, BASE)
    assert not spec.is_uniform_across_layers
    per_layer = [spec.layer_layout(i, PAGE_ELEMS).num_pages for i in range(2)]
    assert per_layer[1] > per_layer[0] and spec.blocks_needed(PAGE_ELEMS) == per_layer[1]


def test_tp2_matrices_hold_half_the_elements(specs):
    for spec in specs[:4]:  # ranks divisible by 2
        whole = spec.layer_matrices(0)
        for tp_rank in (0, 1):
            shard = spec.layer_matrices(0, tp_size=2, tp_rank=tp_rank)
            assert [m.rows * m.row_len * 2 for m in shard] == [m.rows * m.row_len for m in whole]
        assert spec.num_elements(tp_size=2) * 2 == spec.num_elements()
        # Pages shrink by 1/tp too, so blocks per adapter stay (nearly) the same.
        assert abs(spec.blocks_needed(PAGE_ELEMS // 2, tp_size=2) - spec.blocks_needed(PAGE_ELEMS)) <= 2


def test_tp_pads_odd_rank_on_column_parallel_slices(specs):
    spec = specs[4]  # rank 5
    shard = spec.layer_matrices(0, tp_size=2, tp_rank=1)
    q_a, q_bt, k_a, k_bt, v_a, v_bt, o_a, o_bt = shard[:8]
    assert (q_a.rows, q_a.row_len, q_bt.rows, q_bt.row_len) == (3, 64, 6, 32)
    assert (k_bt.rows, k_bt.row_len) == (6, 16)
    assert (o_a.rows, o_a.row_len, o_bt.rows, o_bt.row_len) == (5, 32, 5, 32)  # row-parallel: no padding


def test_tp_shards_reassemble_the_full_weights(specs):
    spec = specs[4]
    weights = load_adapter_weights(spec)
    whole = weights.page_matrices(1)
    shards = [weights.page_matrices(1, tp_size=2, tp_rank=r) for r in (0, 1)]
    for i, projection in enumerate(SLICE_ORDER):
        a, bt = whole[2 * i], whole[2 * i + 1]
        a0, bt0, a1, bt1 = shards[0][2 * i], shards[0][2 * i + 1], shards[1][2 * i], shards[1][2 * i + 1]
        if projection in ("o_proj", "down_proj"):
            assert torch.equal(torch.cat([a0, a1], dim=1), a)
            assert torch.equal(torch.cat([bt0, bt1], dim=1), bt)
        else:
            assert torch.equal(torch.cat([a0, a1])[:5], a) and a1[-1].abs().sum() == 0  # padding row
            assert torch.equal(torch.cat([bt0, bt1], dim=1)[:5], bt) and bt0[5:].abs().sum() == 0
    for r in (0, 1):
        assert [tuple(t.shape) for t in shards[r]] == [
            (m.rows, m.row_len) for m in spec.layer_matrices(1, tp_size=2, tp_rank=r)
        ]


def test_tp_replicates_kv_heads_when_fewer_than_ranks():
    shards = [BASE.for_tp(4, r) for r in range(4)]
    assert [s.out_range("k_proj") for s in shards] == [(0, 16), (0, 16), (16, 32), (16, 32)]
    assert [s.out_range("q_proj") for s in shards] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    with pytest.raises(ValueError, match="num_attention_heads"):
        BaseModelShape.from_hf_config(dict(TINY_LLAMA, num_attention_heads=2, num_key_value_heads=2,
                                           head_dim=32)).for_tp(4, 0)


def test_loaded_weights_equal_file_and_keep_scaling_separate(specs):
    spec = specs[1]
    file = load_file(os.path.join(spec.path, "adapter_model.safetensors"))
    weights = load_adapter_weights(spec, dtype=torch.bfloat16)
    for layer, slices in enumerate(weights.layers):
        for w, s in zip(slices, spec.layers[layer]):
            assert w.projection == s.projection and w.scaling == s.scaling == 2.0
            assert w.a.dtype == torch.bfloat16
            assert torch.equal(w.a, file[s.a_key].to(torch.bfloat16))
            assert torch.equal(w.b, file[s.b_key].to(torch.bfloat16))  # not scaled
        assert [tuple(t.shape) for t in weights.page_matrices(layer)] == [
            (m.rows, m.row_len) for m in spec.layer_matrices(layer)
        ]
    assert spec.scalings().shape == (2, 7) and spec.ranks().tolist() == [[16] * 7] * 2


def test_untargeted_slices_have_rank_zero(tmp_path):
    adapter = generate_adapters(TINY_LLAMA, tmp_path, 1, ranks=(8,), target_modules=("v_proj", "up_proj"))[0]
    spec = inspect_adapter(adapter.name, adapter.path, BASE)
    assert spec.ranks()[0].tolist() == [0, 0, 8, 0, 0, 8, 0]
    weights = load_adapter_weights(spec)
    assert weights.layers[0][0].a.shape == (0, 64) and weights.layers[0][0].b.shape == (64, 0)
    assert spec.blocks_needed(PAGE_ELEMS) == plan_layout(spec.layer_matrices(0), PAGE_ELEMS).num_pages


def test_registry_versions_survive_reregistration(specs):
    registry = AdapterRegistry(BASE, max_lora_rank=64, page_elems=PAGE_ELEMS, pool_blocks=1000)
    first = registry.register("a", specs[0].path)
    assert first.version == 1 and "a" in registry and len(registry) == 1
    assert registry.register("a", specs[1].path).version == 2
    assert registry.unregister("a") is not None and "a" not in registry
    assert registry.register("a", specs[0].path).version == 3
    assert list(registry) == ["a"] and registry["a"].max_rank == 8
    # Versions are unique across names too, and unregistered names leave nothing behind.
    assert registry.register("b", specs[0].path).version == 4
    for i in range(100):
        registry.register(f"n{i}", specs[0].path)
        registry.unregister(f"n{i}")
    assert len(registry) == 2 and not isinstance(registry._last_version, dict)
