"""S-LoRA tensor-parallel sharding of the paged layers, TP=2 without an engine.

Two "ranks" run in two threads, each with its own worker manager (tp_rank 0 / 1), its
own pools with half-size pages, its own shard of every base weight, and the same block
ids (one scheduler plan). The collectives are real exchanges between the threads. The
reference is the unsharded layer plus scaling * (x @ A^T) @ B^T read from the adapter
files (tests/test_paged_worker_layers.py), independent of the sharding code.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from torch import nn

from tests.test_paged_worker_layers import NUM_BLOCKS, PAGE_ELEMS, TINY, base, reference_delta  # noqa: F401
from vllm_slora.adapters import inspect_adapter
from vllm_slora.adapters.generate import generate_adapters
from vllm_slora.paged.layers import install_paged_layers
from vllm_slora.paged.manager import PagedAdapterManager
from vllm_slora.paged.tensor_parallel import TPGroup
from vllm_slora.step_plan import AdapterPlacement, SLoRAStepPlan

TP = 2
MODULE_SHAPES = {  # name -> (in, out) of the full weight, and whether it is row-parallel
    "qkv_proj": (128, 256, False),  # q 128 + k 64 + v 64
    "o_proj": (128, 128, True),
    "gate_up_proj": (128, 512, False),
    "down_proj": (256, 128, True),
}


class ThreadGroup:
    """Collectives between TP threads: every rank posts its tensor, then reads them all."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[torch.Tensor | None] = [None] * size
        self.barrier = threading.Barrier(size)
        self.calls = 0

    def _exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        if rank == 0:
            self.calls += 1
        return parts

    def member(self, rank: int) -> TPGroup:
        return TPGroup(
            size=self.size,
            rank=rank,
            all_gather_last=lambda t: torch.cat(self._exchange(rank, t), dim=-1),
            all_reduce=lambda t: torch.stack(self._exchange(rank, t)).sum(0).to(t.dtype),
        )


class ColumnShard(nn.Module):
    """A column-parallel layer's shard: output rows ``rows`` of the full weight."""

    def __init__(self, weight: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight[rows]
        self.output_size_per_partition = self.weight.shape[0]

    def forward(self, x):
        return x @ self.weight.t(), None


class RowShard(nn.Module):
    """A row-parallel layer's shard, with the fields vLLM's forward reads."""

    input_is_parallel = True
    skip_bias_add = False
    reduce_results = True
    return_bias = True
    bias = None

    def __init__(self, weight: torch.Tensor, rank: int, group: TPGroup) -> None:
        super().__init__()
        width = weight.shape[1] // TP
        self.weight = weight[:, rank * width : (rank + 1) * width]
        self.output_size_per_partition = weight.shape[0]  # full width, as in vLLM
        self.tp_rank = rank
        self.group = group
        self.quant_method = self

    def apply(self, layer, x, bias=None):  # vLLM's quant_method.apply(layer, x, bias)
        return x @ self.weight.t()

    def forward(self, x):
        return self.group.all_reduce(self.apply(self, x)), None


def column_rows(module: str, rank: int) -> torch.Tensor:
    """Full-weight output rows rank ``rank`` holds, slice by slice (as vLLM shards them)."""
    sizes = {"qkv_proj": (128, 64, 64), "gate_up_proj": (256, 256)}[module]
    rows, start = [], 0
    for size in sizes:
        part = size // TP
        rows.append(torch.arange(start + rank * part, start + (rank + 1) * part))
        start += size
    return torch.cat(rows)


@pytest.fixture(scope="module")
def tp_adapters(tmp_path_factory):
    """Ranks that do not divide by 2 (1, 3) next to 4/16, attention-only rslora at 7."""
    root = tmp_path_factory.mktemp("tp-adapters")
    found = generate_adapters(TINY, root, 4, ranks=(1, 3, 4, 16), seed=11, name_prefix="all")
    found += generate_adapters(TINY, root, 1, ranks=(7,), seed=12, name_prefix="attn",
                               target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), use_rslora=True)
    return [(20 + i, a.name, a.path) for i, a in enumerate(found)]


def run_rank(rank, group, base, weights, placements, token_ids, inputs, results):
    tp = group.member(rank)
    manager = PagedAdapterManager(base, torch.float32, "cpu", 64 << 20, tp_size=TP, tp_rank=rank,
                                  max_num_tokens=16, max_adapters_per_step=8)
    per_layer = NUM_BLOCKS * PAGE_ELEMS // TP
    storage = torch.randn(TINY["num_hidden_layers"] * per_layer)
    manager.attach_pool([storage[i * per_layer : (i + 1) * per_layer] for i in range(2)], PAGE_ELEMS // TP)
    manager.apply_plan(SLoRAStepPlan(load=placements))
    manager.set_token_mapping(token_ids)

    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList()
    for layer in range(2):
        block = nn.Module()
        block.self_attn, block.mlp = nn.Module(), nn.Module()
        for module, (_, _, row) in MODULE_SHAPES.items():
            w = weights[layer, module]
            shard = RowShard(w, rank, tp) if row else ColumnShard(w, column_rows(module, rank))
            setattr(block.self_attn if module in ("qkv_proj", "o_proj") else block.mlp, module, shard)
        model.model.layers.append(block)
    wrapped = install_paged_layers(model, manager.state, manager.backend, base, (ColumnShard, RowShard), tp)
    assert len(wrapped) == 8
    for w in wrapped:
        x = inputs[w.layer_index, w.module_name]
        if w.row_parallel:
            width = x.shape[1] // TP
            x = x[:, rank * width : (rank + 1) * width]
        results[rank, w.layer_index, w.module_name] = w(x)[0]


def test_tp2_matches_unsharded_reference(base, tp_adapters):
    gen = torch.Generator().manual_seed(0)
    weights = {(layer, m): torch.randn(out, inp, generator=gen) / inp**0.5
               for layer in range(2) for m, (inp, out, _) in MODULE_SHAPES.items()}
    token_ids = [20, 0, 21, 21, 22, 23, 0, 24, 20, 24, 23, 0]
    inputs = {(layer, m): torch.randn(len(token_ids), inp, generator=gen)
              for layer in range(2) for m, (inp, _, _) in MODULE_SHAPES.items()}

    # One plan for both ranks: blocks per adapter at tp=2 with half pages == tp=1.
    free = list(range(1, NUM_BLOCKS))
    random.Random(1).shuffle(free)
    placements = []
    for lora_int_id, name, path in tp_adapters:
        spec = inspect_adapter(name, path, base, tp_size=TP)
        need = spec.blocks_needed(PAGE_ELEMS // TP, TP)
        if spec.max_rank % TP == 0:  # odd ranks are padded on column-parallel slices
            assert need == spec.blocks_needed(PAGE_ELEMS, 1), "blocks per adapter must not depend on tp"
            assert spec.num_elements(TP, 0) * TP == spec.num_elements(1, 0), "each rank holds half"
        placements.append(AdapterPlacement(lora_int_id, name, path, 1, tuple(free[:need])))
        free = free[need:]

    group, results = ThreadGroup(TP), {}
    threads = [threading.Thread(target=run_rank, args=(r, group, base, weights, placements, token_ids,
                                                       inputs, results)) for r in range(TP)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == TP * 8, "a rank failed (see the thread's traceback above)"
    assert group.calls > 0

    paths = {i: p for i, _, p in tp_adapters}
    for layer in range(2):
        for module, (_, _, row) in MODULE_SHAPES.items():
            x = inputs[layer, module]
            expected = x @ weights[layer, module].t()
            sizes = {"qkv_proj": (128, 64, 64), "o_proj": (128,), "gate_up_proj": (256, 256),
                     "down_proj": (128,)}[module]
            for t, lora_id in enumerate(token_ids):
                if lora_id:
                    start = 0
                    for size, part in zip(sizes, reference_delta(paths[lora_id], layer, module, x[t : t + 1])):
                        if part is not None:
                            expected[t, start : start + size] += part[0]
                        start += size
            if row:  # every rank holds the all-reduced full output
                got = [results[r, layer, module] for r in range(TP)]
                torch.testing.assert_close(got[0], got[1], rtol=0, atol=0)
                torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-4, msg=f"{module} L{layer}")
            else:  # rank r holds its output rows of every slice
                for r in range(TP):
                    want = expected[:, column_rows(module, r)]
                    torch.testing.assert_close(results[r, layer, module], want, rtol=1e-4, atol=1e-4,
                                               msg=f"{module} L{layer} rank {r}")
