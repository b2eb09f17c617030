"""The runner hook's plumbing on a stand-in runner (no engine): class swap, no stock LoRA
manager, pool views after KV allocation, the plan applied before the forward, vLLM's
per-request lora ids turned into adapter rows, dummy-run hooks, and the LoRA RPCs.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import vllm_slora.paged.runner as runner_module
from tests.test_paged_worker_layers import TINY, FakeLinear, adapters  # noqa: F401  (fixture)
from vllm_slora.config import SLoRAConfig
from vllm_slora.paged.layers import PagedLoRALinear
from vllm_slora.paged.manager import PagedAdapterManager
from vllm_slora.paged.runner import SLoRARunnerMixin, install_runner_mixin
from vllm_slora.paged.tensor_parallel import TPGroup
from vllm_slora.step_plan import AdapterPlacement, SLoRAStepPlan

NUM_BLOCKS, KV_HEADS, BLOCK_TOKENS, HEAD_DIM = 40, 2, 16, 32
PAGE_BYTES = KV_HEADS * 2 * BLOCK_TOKENS * HEAD_DIM * 4  # K and V, float32


class TinyDecoder(nn.Module):
    supports_lora = True

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for i in range(2):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            layer.self_attn.qkv_proj = FakeLinear(128, 256, i)
            layer.self_attn.o_proj = FakeLinear(128, 128, i + 2)
            layer.mlp = nn.Module()
            layer.mlp.gate_up_proj = FakeLinear(128, 512, i + 4)
            layer.mlp.down_proj = FakeLinear(256, 128, i + 6)
            self.model.layers.append(layer)


class StandInRunner:
    """What the mixin relies on of vLLM's runner, and nothing else."""

    def __init__(self) -> None:
        self.kv_caches: list[torch.Tensor] = []
        self.seen_resident_at_forward: set[int] = set()

    def initialize_kv_cache(self, kv_cache_config, is_profiling: bool = False) -> None:
        storage = torch.zeros(2 * NUM_BLOCKS * PAGE_BYTES // 4)
        per_layer = NUM_BLOCKS * PAGE_BYTES // 4
        self.kv_caches = [
            storage[i * per_layer : (i + 1) * per_layer].view(NUM_BLOCKS, KV_HEADS, 2 * BLOCK_TOKENS, HEAD_DIM)
            for i in range(2)
        ]

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        # vLLM: update states, prepare inputs (-> set_active_loras), forward.
        self.seen_resident_at_forward = set(self.slora.resident)
        self.set_active_loras(scheduler_output.input_batch, scheduler_output.num_scheduled_tokens)
        qkv = self.model.model.layers[0].self_attn.qkv_proj
        return qkv(scheduler_output.x)[0], qkv.base_layer(scheduler_output.x)[0]


def vllm_config():
    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        model_config=SimpleNamespace(hf_config=SimpleNamespace(to_dict=lambda: dict(TINY)), dtype=torch.float32),
        lora_config=SimpleNamespace(max_lora_rank=64, max_loras=4),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=32),
    )


@pytest.fixture()
def runner(monkeypatch):
    monkeypatch.setattr(
        runner_module, "worker_lora_internals", lambda: (lambda m: True, (FakeLinear, nn.Identity), TPGroup)
    )
    r = StandInRunner()
    install_runner_mixin(r, SLoRAConfig())
    r.model = r.load_lora_model(TinyDecoder(), vllm_config(), torch.device("cpu"))
    kv_config = SimpleNamespace(
        num_blocks=NUM_BLOCKS,
        kv_cache_groups=[SimpleNamespace(kv_cache_spec=SimpleNamespace(page_size_bytes=PAGE_BYTES))],
    )
    r.initialize_kv_cache(kv_config)
    return r


def test_class_swap_and_no_stock_lora_manager(runner):
    assert isinstance(runner, SLoRARunnerMixin) and isinstance(runner, StandInRunner)
    assert type(runner).__name__ == "SLoRAStandInRunner"
    assert isinstance(runner.lora_manager, PagedAdapterManager)  # never vLLM's LRU manager
    assert isinstance(runner.model.model.layers[1].mlp.gate_up_proj, PagedLoRALinear)
    assert runner.slora.page_elems == PAGE_BYTES // 4 and len(runner.slora.state.pools) == 2
    # The pool views alias the KV tensors.
    runner.slora.state.pools[1][3 * runner.slora.page_elems] = 5.0
    assert runner.kv_caches[1][3].flatten()[0] == 5.0


def test_plan_is_applied_before_the_forward(runner, adapters):  # noqa: F811
    (lora_id, name, path) = adapters[1]
    spec = runner.slora.host_cache.inspect(name, path)
    blocks = random.Random(1).sample(range(1, NUM_BLOCKS), spec.blocks_needed(runner.slora.page_elems))
    placement = AdapterPlacement(lora_id, name, path, 1, tuple(blocks))
    # Two requests: one with the adapter (3 tokens), one without (2 tokens).
    batch = SimpleNamespace(request_lora_mapping=np.array([lora_id, 0, 0], dtype=np.int32), num_reqs=2)
    out = SimpleNamespace(
        slora=SLoRAStepPlan(load=[placement]),
        input_batch=batch, num_scheduled_tokens=np.array([3, 2]), x=torch.randn(5, 128),
    )
    with_lora, base = runner.execute_model(out)
    assert lora_id in runner.seen_resident_at_forward
    assert not torch.allclose(with_lora[:3], base[:3])
    assert torch.equal(with_lora[3:], base[3:])


def test_dummy_runs_map_no_token_but_keep_the_lora_op(runner, adapters):  # noqa: F811
    """A dummy run (what vLLM traces and captures) maps every token to no adapter, yet
    still runs the layers' LoRA op on the same static metadata a real step uses: a graph
    recorded there must contain the LoRA path (the old `has_lora` branch left it out)."""
    md = runner.slora.state
    static = [t.data_ptr() for t in md.static_tensors()]
    md.token_adapter[:4] = 0  # stale entries a dummy run must overwrite
    md.num_mapped = 4
    calls = []
    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    original = qkv.lora.apply
    qkv.lora.apply = lambda x, y: (calls.append(x.shape[0]), original(x, y))
    try:
        with runner.maybe_dummy_run_with_lora(object(), np.array([4]), np.array([1]), True, 3):
            assert md.token_adapter.tolist() == [-1] * md.max_tokens and not md.any_adapter
            x = torch.randn(4, 128)
            assert torch.equal(qkv(x)[0], qkv.base_layer(x)[0])
        with runner.maybe_setup_dummy_loras(object()):
            with runner.maybe_select_dummy_loras(object(), np.array([4]), None, None, 2):
                assert not md.any_adapter
        runner.maybe_remove_all_loras(object())
    finally:
        qkv.lora.apply = original
    assert calls == [4]  # the op ran (and found nothing to add)
    assert [t.data_ptr() for t in md.static_tensors()] == static


def test_lora_rpcs(runner, adapters, tmp_path):  # noqa: F811
    from vllm.lora.request import LoRARequest

    from vllm_slora.adapters import AdapterError

    lora_id, name, path = adapters[0]
    assert runner.add_lora(LoRARequest(name, lora_id, path))
    assert runner.list_loras() == {lora_id} and runner.pin_lora(lora_id)
    assert runner.remove_lora(lora_id) and runner.list_loras() == set()
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}')
    with pytest.raises(AdapterError, match="'broken'"):
        runner.add_lora(LoRARequest("broken", 77, str(tmp_path)))


def test_kernel_backend_triton_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(
        runner_module, "worker_lora_internals", lambda: (lambda m: True, (FakeLinear, nn.Identity), TPGroup)
    )
    r = StandInRunner()
    install_runner_mixin(r, SLoRAConfig(kernel_backend="triton"))
    with pytest.raises(ValueError, match="kernel_backend.*no CUDA device"):
        r.load_lora_model(TinyDecoder(), vllm_config(), torch.device("cpu"))
    install_runner_mixin(r, SLoRAConfig(kernel_backend="torch"))
    r.load_lora_model(TinyDecoder(), vllm_config(), torch.device("cpu"))
    assert r.slora.backend.name == "torch"


def test_kernel_backend_auto_on_cpu_is_native_when_built(monkeypatch):
    from vllm_slora.paged.ops import cpu_native

    monkeypatch.setattr(
        runner_module, "worker_lora_internals", lambda: (lambda m: True, (FakeLinear, nn.Identity), TPGroup)
    )
    r = StandInRunner()
    install_runner_mixin(r, SLoRAConfig())
    r.load_lora_model(TinyDecoder(), vllm_config(), torch.device("cpu"))
    assert r.slora.backend.name == ("native" if cpu_native.available() else "torch")
