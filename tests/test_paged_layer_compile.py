"""The paged layers under torch.compile: a CPU proxy for what vLLM does on CUDA.

vLLM traces the model once, in a dummy run where no token has an adapter, drops the
guards and (on CUDA) captures graphs through the same path. Whatever that trace
contains is what every later step runs. These tests do the same on CPU: trace with no
adapter mapped, then run steps with adapters — other counts, other ranks, a new
maximum rank, other batch sizes — and require

* outputs equal to the dense reference read from the adapter files (independent of the
  code under test), tokens without adapter bit-exact;
* one trace for all of it (a guard failure or a Python branch on per-step state would
  re-trace or, with guards dropped as vLLM does, silently serve the traced branch);
* the same metadata tensors at the same addresses throughout.

This file's punica-style scenario mirrors punica's CUDA-graph test (capture once, then
replay with new adapter indices written into the same buffers).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch import nn

from tests.test_paged_worker_layers import (  # noqa: F401  (fixtures)
    MODULE_PROJECTIONS,
    NUM_BLOCKS,
    PAGE_ELEMS,
    TINY,
    FakeLinear,
    adapters,
    base,
    cpu_backends,
    make_pools,
    place,
    reference_delta,
)
from vllm_slora.paged.layers import PagedLoRALinear, slice_out_sizes
from vllm_slora.paged.manager import PagedAdapterManager
from vllm_slora.step_plan import SLoRAStepPlan

IN_FEATURES = {"qkv_proj": 128, "o_proj": 128, "gate_up_proj": 128, "down_proj": 256}


class TwoLayerStack(nn.Module):
    """Every paged module of both decoder layers, applied to its own input."""

    def __init__(self, base, manager) -> None:
        super().__init__()
        self.wrapped = nn.ModuleList()
        for layer in range(TINY["num_hidden_layers"]):
            for module in MODULE_PROJECTIONS:
                sizes = slice_out_sizes(base, module, 1, 0)
                linear = FakeLinear(IN_FEATURES[module], sum(sizes), seed=layer * 10 + len(module))
                self.wrapped.append(PagedLoRALinear(linear, module, layer, sizes, manager.state, manager.backend))

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(x)[0] for layer, x in zip(self.wrapped, inputs)]


class CountingBackend:
    """A torch.compile backend that counts traces and runs AOT-autograd's functionalized
    graph (where a mutating custom op must survive as a mutation of the layer output)."""

    def __init__(self) -> None:
        self.traces = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        self.traces += 1
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)


def expected_outputs(model, inputs, token_ids, paths) -> list[torch.Tensor]:
    """base(x) + scaling * (x A^T) B^T per token, from the adapter files."""
    outs = []
    for wrapper, x in zip(model.wrapped, inputs):
        out = wrapper.base_layer(x)[0].clone()
        for t, lora_id in enumerate(token_ids):
            if lora_id == 0:
                continue
            start = 0
            parts = reference_delta(paths[lora_id], wrapper.layer_index, wrapper.module_name, x[t : t + 1])
            for size, part in zip(wrapper.out_sizes, parts):
                if part is not None:
                    out[t, start : start + size] += part[0]
                start += size
        outs.append(out)
    return outs


def make_inputs(num_tokens: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(num_tokens, IN_FEATURES[m], generator=gen) for _ in range(2) for m in MODULE_PROJECTIONS]


@pytest.fixture(params=cpu_backends())
def manager(base, request):  # noqa: F811
    m = PagedAdapterManager(base, torch.float32, "cpu", 64 << 20, max_num_tokens=64, max_adapters_per_step=4,
                            kernel_backend=request.param)
    m.attach_pool(make_pools(), PAGE_ELEMS)
    return m


def check(got, want, token_ids) -> None:
    for g, w in zip(got, want):
        for t, lora_id in enumerate(token_ids):
            if lora_id == 0:
                assert torch.equal(g[t], w[t]), "a token without adapter changed"
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_traced_without_adapters_serves_every_later_step(base, manager, adapters):  # noqa: F811
    torch._dynamo.reset()
    paths = {i: p for i, _, p in adapters}
    model = TwoLayerStack(base, manager)
    backend = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    md = manager.state
    static = [(t.data_ptr(), t.shape) for t in md.static_tensors()]

    # The dummy run vLLM traces in: no adapter mapped (profile / warm-up / capture).
    manager.clear_step()
    dummy = make_inputs(6, seed=0)
    check(compiled(dummy), expected_outputs(model, dummy, [0] * 6, paths), [0] * 6)
    assert backend.traces == 1

    free = list(range(1, NUM_BLOCKS))
    random.Random(9).shuffle(free)
    manager.apply_plan(SLoRAStepPlan(load=place(manager, adapters, free)))
    steps = [
        [10, 0, 11, 11, 0, 10, 10],  # 2 adapters of ranks 4 and 8
        [12, 12, 0, 10, 11, 12, 0, 11, 10, 12, 11],  # 3 adapters, new ranks (16)
        [13, 0, 13, 12, 0],  # a new maximum rank (32, rslora) beside rank 16
        [0, 0, 0],  # back to none
        [11, 13, 10, 12] * 5,  # 4 adapters, every slot
    ]
    for seed, token_ids in enumerate(steps, start=1):
        manager.set_token_mapping(token_ids)
        inputs = make_inputs(len(token_ids), seed=seed)
        check(compiled(inputs), expected_outputs(model, inputs, token_ids, paths), token_ids)
    assert backend.traces == 1, "a step re-traced: the graph depended on per-step state"
    assert [(t.data_ptr(), t.shape) for t in md.static_tensors()] == static, "metadata was reallocated"


def test_inductor_compiled_layer_equals_eager(base, manager, adapters):  # noqa: F811
    """Inductor's functionalization and re-inplacing must keep the op's in-place delta."""
    torch._dynamo.reset()
    free = list(range(1, NUM_BLOCKS))
    manager.apply_plan(SLoRAStepPlan(load=place(manager, adapters, free)))
    model = TwoLayerStack(base, manager)
    model.wrapped = model.wrapped[:2]  # qkv and o of layer 0: keeps the inductor build short
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    manager.clear_step()
    compiled(make_inputs(4, seed=0)[:2])  # traced with no adapter
    paths = {i: p for i, _, p in adapters}
    for seed, token_ids in enumerate(([13, 0, 10, 11], [12, 12, 0, 13, 11, 0, 10]), start=1):
        manager.set_token_mapping(token_ids)
        inputs = make_inputs(len(token_ids), seed=seed)[:2]
        check(compiled(inputs), expected_outputs(model, inputs, token_ids, paths), token_ids)


def test_slots_are_sticky_and_written_once(base, manager, adapters):  # noqa: F811
    """A steady adapter set costs no table writes; eviction frees the slot."""
    md = manager.state
    free = list(range(1, NUM_BLOCKS))
    placements = place(manager, adapters, free)
    manager.apply_plan(SLoRAStepPlan(load=placements))
    manager.set_token_mapping([10, 11, 0])
    writes = md.table_writes
    slots = dict(md.slot_of)
    for _ in range(3):
        manager.set_token_mapping([11, 0, 10, 10])
    assert md.table_writes == writes and md.slot_of == slots
    manager.apply_plan(SLoRAStepPlan(evicted=[10]))
    assert 10 not in md.slot_of
    assert md.tables["qkv_proj"].a_ranks[:, slots[10]].sum() == 0
    # Adapter 10 comes back in other blocks: same id, new rows, so its slot is rewritten.
    manager.apply_plan(SLoRAStepPlan(load=place(manager, adapters[:1], free)))
    manager.set_token_mapping([10, 11, 12, 13])
    assert md.table_writes == writes + 3  # 10 again, 12 and 13 new
    with pytest.raises(RuntimeError, match="more than 4 distinct adapters"):
        # A fifth adapter (adapter 0's files in adapter 0's old blocks, under id 99).
        manager.apply_plan(SLoRAStepPlan(load=[dataclasses.replace(placements[0], lora_int_id=99)]))
        manager.set_token_mapping([10, 11, 12, 13, 99])
