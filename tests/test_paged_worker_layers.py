"""Paged LoRA layers on a fake pool, against a dense reference read straight from disk.

No engine: a flat pool per layer, synthetic PEFT adapters of mixed ranks/targets placed
at shuffled, non-contiguous blocks by the worker's own plan path (host cache -> packing
-> page copy -> row tables), and wrapped stand-in linear layers that keep vLLM's
(output, bias) contract. The reference is base(x) + scaling * (x @ A^T) @ B^T with A, B
and scaling read with safetensors/json directly, independent of the code under test.
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
from safetensors import safe_open
from torch import nn

from vllm_slora.adapters import AdapterError, BaseModelShape
from vllm_slora.adapters.generate import generate_adapters
from vllm_slora.adapters.validation import adapter_files_identity
from vllm_slora.paged.layers import PagedLoRALinear, decoder_layer_index, install_paged_layers, slice_out_sizes
from vllm_slora.paged.manager import PagedAdapterManager
from vllm_slora.paged.pool_views import flat_pool_views
from vllm_slora.step_plan import AdapterPlacement, AdapterSource, SLoRAStepPlan

TINY = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
)
PAGE_ELEMS = 1024  # small pages: every adapter spans several, rows of 256 fit 4 a page
NUM_BLOCKS = 96
MODULE_PROJECTIONS = {
    "qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "o_proj": ("self_attn", ("o_proj",)),
    "gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
    "down_proj": ("mlp", ("down_proj",)),
}


class FakeLinear(nn.Module):
    """Stands in for a vLLM linear layer: forward returns (output, bias)."""

    def __init__(self, in_features: int, out_features: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(out_features, in_features, generator=gen) / math.sqrt(in_features))
        self.output_size_per_partition = out_features

    def forward(self, x):
        return x @ self.weight.t(), None


@pytest.fixture(scope="module")
def base() -> BaseModelShape:
    return BaseModelShape.from_hf_config(TINY, dtype=torch.float32)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """(lora_int_id, name, path): ranks 4/8/16 on all projections, 32 on attention with rslora."""
    root = tmp_path_factory.mktemp("paged-adapters")
    found = generate_adapters(TINY, root, 3, ranks=(4, 8, 16), seed=7, name_prefix="all")
    found += generate_adapters(TINY, root, 1, ranks=(32,), seed=8, name_prefix="attn",
                               target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), use_rslora=True)
    return [(10 + i, a.name, a.path) for i, a in enumerate(found)]


def reference_delta(adapter_path: str, layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
    """scaling * (x @ A^T) @ B^T per slice; None for untargeted slices."""
    with open(f"{adapter_path}/adapter_config.json") as f:
        config = json.load(f)
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
    parent, projections = MODULE_PROJECTIONS[module]
    parts = []
    with safe_open(f"{adapter_path}/adapter_model.safetensors", framework="pt") as f:
        for proj in projections:
            key = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
            if proj not in config["target_modules"]:
                parts.append(None)
                continue
            a = f.get_tensor(f"{key}.lora_A.weight").double()
            b = f.get_tensor(f"{key}.lora_B.weight").double()
            parts.append((scaling * (x.double() @ a.t()) @ b.t()).float())
    return parts


def make_pools(seed: int = 0) -> list[torch.Tensor]:
    """Per-layer flat views into ONE shared storage, like vLLM's KV allocation: every
    view but the first starts at a nonzero storage offset (so must any pool reader)."""
    gen = torch.Generator().manual_seed(seed)
    per_layer = NUM_BLOCKS * PAGE_ELEMS
    storage = torch.randn(TINY["num_hidden_layers"] * per_layer, generator=gen)
    return [storage[i * per_layer : (i + 1) * per_layer] for i in range(TINY["num_hidden_layers"])]


def place(manager, adapters, block_pool: list[int]):
    """Give each adapter the next blocks of a shuffled list; returns the placements."""
    placements = []
    for lora_int_id, name, path in adapters:
        spec = manager.host_cache.inspect(name, path)
        need = spec.blocks_needed(PAGE_ELEMS)
        blocks, block_pool[:] = tuple(block_pool[:need]), block_pool[need:]
        placements.append(AdapterPlacement(lora_int_id, name, path, 1, blocks, files=spec.files))
    return placements


def cpu_backends() -> list[str]:
    """Every CPU backend this install has (the native kernel only when it was built)."""
    from vllm_slora.paged.ops import cpu_native

    return ["torch"] + (["native"] if cpu_native.available() else [])


@pytest.fixture(params=cpu_backends())
def manager(base, request):
    m = PagedAdapterManager(base, torch.float32, "cpu", 64 << 20, max_num_tokens=32, max_adapters_per_step=6,
                            kernel_backend=request.param)
    m.attach_pool(make_pools(), PAGE_ELEMS)
    return m


def wrapped_layer(base, manager, module: str, layer: int) -> PagedLoRALinear:
    in_features = {"qkv_proj": 128, "o_proj": 128, "gate_up_proj": 128, "down_proj": 256}[module]
    sizes = slice_out_sizes(base, module, 1, 0)
    return PagedLoRALinear(FakeLinear(in_features, sum(sizes), seed=layer * 10 + len(module)), module, layer,
                           sizes, manager.state, manager.backend)


def check_all_layers(base, manager, adapters, token_ids: list[int]) -> None:
    paths = {i: p for i, _, p in adapters}
    manager.set_token_mapping(token_ids)
    gen = torch.Generator().manual_seed(len(token_ids))
    for layer in range(TINY["num_hidden_layers"]):
        for module in MODULE_PROJECTIONS:
            wrapper = wrapped_layer(base, manager, module, layer)
            x = torch.randn(len(token_ids), wrapper.base_layer.weight.shape[1], generator=gen)
            base_out, _ = wrapper.base_layer(x)
            out, bias = wrapper(x)
            assert bias is None and out.shape == base_out.shape
            sizes = wrapper.out_sizes
            for t, lora_id in enumerate(token_ids):
                if lora_id == 0:
                    # Bit-exact: the delta is never added to tokens without an adapter.
                    assert torch.equal(out[t], base_out[t]), (module, layer, t)
                    continue
                parts = reference_delta(paths[lora_id], layer, module, x[t : t + 1])
                expected = base_out[t].clone()
                start = 0
                for size, part in zip(sizes, parts):
                    if part is not None:
                        expected[start : start + size] += part[0]
                    start += size
                torch.testing.assert_close(out[t], expected, rtol=1e-5, atol=1e-5, msg=f"{module} L{layer} t{t}")


def test_mixed_adapters_match_dense_reference_and_other_pages_untouched(base, manager, adapters):
    before = [p.clone() for p in manager.state.pools]
    free = list(range(1, NUM_BLOCKS))
    random.Random(3).shuffle(free)
    placements = place(manager, adapters, free)
    assert all(list(p.block_ids) != sorted(p.block_ids) for p in placements[:2])  # really scattered
    manager.apply_plan(SLoRAStepPlan(load=placements))

    used = {b for p in placements for b in p.block_ids}
    for layer, (pool, old) in enumerate(zip(manager.state.pools, before)):
        for block in range(NUM_BLOCKS):
            page = slice(block * PAGE_ELEMS, (block + 1) * PAGE_ELEMS)
            if block not in used:
                assert torch.equal(pool[page], old[page]), f"layer {layer} block {block} was written"

    # 13 tokens: every adapter, untouched tokens between them, one adapter absent.
    tokens = [10, 0, 11, 11, 13, 0, 10, 12, 12, 0, 13, 10, 0]
    check_all_layers(base, manager, adapters, tokens)
    # Fewer adapters in a later step (different rows, same resident pages).
    check_all_layers(base, manager, adapters, [0, 13, 13, 0, 11])


def test_no_adapter_step_is_base_output(base, manager, adapters):
    manager.set_token_mapping([0, 0, 0])
    assert not manager.state.any_adapter and manager.state.token_adapter[:3].tolist() == [-1, -1, -1]
    wrapper = wrapped_layer(base, manager, "qkv_proj", 0)
    x = torch.randn(3, 128)
    assert torch.equal(wrapper(x)[0], wrapper.base_layer(x)[0])


def test_evict_and_reload_elsewhere(base, manager, adapters):
    free = list(range(1, NUM_BLOCKS))
    random.Random(5).shuffle(free)
    first = place(manager, adapters[:2], free)
    manager.apply_plan(SLoRAStepPlan(load=first))
    # The blocks of adapter 10 go to the KV cache (overwritten), it comes back elsewhere.
    for pool in manager.state.pools:
        for b in first[0].block_ids:
            pool[b * PAGE_ELEMS : (b + 1) * PAGE_ELEMS] = 1e3
    manager.apply_plan(SLoRAStepPlan(evicted=[10]))
    with pytest.raises(RuntimeError, match=r"\[10\]"):
        manager.set_token_mapping([10, 0])
    again = place(manager, adapters[:1], free)
    manager.apply_plan(SLoRAStepPlan(load=again))
    assert manager.host_cache.hits == 1  # packed once, copied twice
    check_all_layers(base, manager, adapters, [10, 11, 0, 10])


def test_padded_tokens_beyond_mapping_get_no_adapter(base, manager, adapters):
    free = list(range(1, NUM_BLOCKS))
    manager.apply_plan(SLoRAStepPlan(load=place(manager, adapters[:1], free)))
    manager.set_token_mapping([10, 10])
    wrapper = wrapped_layer(base, manager, "o_proj", 1)
    x = torch.randn(20, 128)  # a padded batch, longer than the step's mapped tokens
    out = wrapper(x)[0]
    base_out = wrapper.base_layer(x)[0]
    assert not torch.equal(out[:2], base_out[:2])
    assert torch.equal(out[2:], base_out[2:])


def test_host_cache_is_bounded_lru(base, adapters):
    one = PagedAdapterManager(base, torch.float32, "cpu", 64 << 20)
    one.attach_pool(make_pools(), PAGE_ELEMS)
    sizes = [one.host_cache.get(n, p, 1).nbytes for _, n, p in adapters[:2]]
    small = PagedAdapterManager(base, torch.float32, "cpu", 1)
    small.attach_pool(make_pools(), PAGE_ELEMS)
    cache = small.host_cache
    cache.capacity_bytes = sizes[0] + sizes[1] - 1  # room for one of the two
    (_, n0, p0), (_, n1, p1) = adapters[:2]
    f0, f1 = cache.get(n0, p0, 1).spec.files, cache.get(n1, p1, 1).spec.files
    assert (p1, f1) in cache and (p0, f0) not in cache and cache.nbytes <= cache.capacity_bytes
    # New files at a path replace the old entry (it can never be asked for again).
    rewritten = f"{p1}/adapter_model.safetensors"
    data = open(rewritten, "rb").read()
    os.remove(rewritten)
    open(rewritten, "wb").write(data)
    new = cache.get(n1, p1, 2).spec.files
    assert new != f1 and (p1, new) in cache and (p1, f1) not in cache and len(cache) == 1


def test_add_lora_validates_and_caches(base, manager, adapters, tmp_path):
    lora_id, name, path = adapters[0]
    assert manager.add_adapter(lora_id, name, path)
    key = (path, adapter_files_identity(path))
    assert key in manager.host_cache and lora_id in manager.list_adapters()
    assert manager.pin_adapter(lora_id)
    assert manager.remove_adapter(lora_id) and key not in manager.host_cache and len(manager.host_cache) == 0
    with pytest.raises(AdapterError, match="does not exist"):
        manager.add_adapter(99, "ghost", str(tmp_path / "nowhere"))


def test_flat_pool_views_alias_kv_pages():
    # The CPU backend's per-layer KV view: [blocks, kv_heads, 2 * block_size, head_dim].
    storage = torch.zeros(2 * 6 * 2 * 16 * 8)
    kv = [storage[i * 6 * 256 : (i + 1) * 6 * 256].view(6, 2, 16, 8) for i in range(2)]
    views = flat_pool_views(kv, num_blocks=6, page_bytes=256 * 4, dtype=torch.float32)
    views[1][3 * 256 : 4 * 256] = 7.0
    assert torch.all(kv[1][3] == 7.0) and kv[1].sum() == 7.0 * 256 and kv[0].sum() == 0
    with pytest.raises(NotImplementedError, match="contiguous"):
        flat_pool_views([kv[0].transpose(0, 1)], num_blocks=6, page_bytes=1024, dtype=torch.float32)


def test_install_wraps_projections_only(base, manager):
    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = nn.Module()
            self.self_attn.qkv_proj = FakeLinear(128, 256, 0)
            self.self_attn.o_proj = FakeLinear(128, 128, 1)
            self.mlp = nn.Module()
            self.mlp.gate_up_proj = FakeLinear(128, 512, 2)
            self.mlp.down_proj = FakeLinear(256, 128, 3)

    model = nn.Module()
    model.model = nn.Module()
    model.model.embed_tokens = nn.Embedding(512, 128)
    model.model.layers = nn.ModuleList([Layer(), Layer()])
    model.lm_head = FakeLinear(128, 512, 4)
    # Every FakeLinear counts as column-parallel here (tp=1: no difference in the math).
    installed = install_paged_layers(model, manager.state, manager.backend, base, (FakeLinear, nn.Identity))
    assert len(installed) == 8
    assert isinstance(model.model.layers[1].mlp.down_proj, PagedLoRALinear)
    assert model.model.layers[1].mlp.down_proj.layer_index == 1
    assert isinstance(model.lm_head, FakeLinear)
    assert model.model.layers[0].self_attn.qkv_proj.output_size_per_partition == 256  # forwarded
    assert decoder_layer_index("model.layers.17.mlp.down_proj") == 17


def test_warm_reads_adapters_off_the_step(base, manager, adapters, tmp_path):
    (lora_id, name, path), (_, other_name, other_path) = adapters[:2]
    cache = manager.host_cache
    files = adapter_files_identity(path)
    manager.apply_plan(SLoRAStepPlan(warm=[AdapterSource(name, path, 1, lora_id, files)]))
    manager.apply_plan(SLoRAStepPlan(warm=[AdapterSource(name, path, 1, lora_id, files)]))  # twice: read once
    cache.wait_warm()
    assert cache.warmed == 1 and (path, files) in cache and cache.misses == 0
    # Both namings are answered: ready (the scheduler loads it only after this).
    assert manager.take_report().ready == [(lora_id, 1), (lora_id, 1)]
    # The step that puts it into pages finds it packed: no disk read on the step.
    free = list(range(1, NUM_BLOCKS))
    manager.apply_plan(SLoRAStepPlan(load=place(manager, adapters[:1], free)))
    assert cache.misses == 0 and cache.hits == 1
    check_all_layers(base, manager, adapters, [lora_id, 0, lora_id])
    # An adapter not warmed is read on the step (fallback when the cache lost it).
    manager.apply_plan(SLoRAStepPlan(load=place(manager, adapters[1:2], free)))
    assert cache.misses == 1 and (other_path, adapter_files_identity(other_path)) in cache and other_name

    # A broken adapter warmed in the background is reported failed, with its own error.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    manager.apply_plan(SLoRAStepPlan(warm=[AdapterSource("broken", str(broken), 1, 77, adapter_files_identity(broken))]))
    cache.wait_warm()
    assert cache.warmed == 1
    (failed,) = manager.take_report().failed
    assert failed[:2] == (77, 1) and "'broken'" in failed[2] and "TP rank 0" in failed[2]
    with pytest.raises(AdapterError, match="broken"):
        cache.get("broken", str(broken), 1)


@pytest.mark.parametrize("backend", cpu_backends())
def test_steps_that_switch_every_slot_match_dense_reference(base, adapters, backend):
    """Two slots, four adapters: each step brings several adapters into slots other adapters
    held (their rows written together, one copy per table); outputs stay equal to the dense
    reference, adapters that stay keep their slot, and only new ones are written."""
    manager = PagedAdapterManager(base, torch.float32, "cpu", 64 << 20, max_num_tokens=32, max_adapters_per_step=2,
                                  kernel_backend=backend)
    manager.attach_pool(make_pools(), PAGE_ELEMS)
    free = list(range(1, NUM_BLOCKS))
    manager.apply_plan(SLoRAStepPlan(load=place(manager, adapters, free)))
    state = manager.state
    check_all_layers(base, manager, adapters, [10, 0, 11, 11])
    assert state.table_writes == 2
    check_all_layers(base, manager, adapters, [12, 13, 0, 13])  # both slots taken over at once
    assert state.table_writes == 4 and set(state.slot_of) == {12, 13}
    kept = state.slot_of[13]
    check_all_layers(base, manager, adapters, [13, 10, 10])  # 13 stays, 10 takes 12's slot
    assert state.slot_of[13] == kept and state.table_writes == 5
    check_all_layers(base, manager, adapters, [11, 12, 0])
    assert state.table_writes == 7
    with pytest.raises(RuntimeError, match="more than 2 distinct adapters"):
        manager.set_token_mapping([10, 11, 12])
