"""What co-served training keeps out of the KV cache (finetune/memory.py, SLoRAWorkerMixin)."""

from __future__ import annotations

import types

import pytest

from vllm_slora.config import SLoRAConfig
from vllm_slora.finetune import memory
from vllm_slora.finetune.layer_units import activation_bytes, layer_graph_bytes
from vllm_slora.finetune.lora_params import LoraParams, LoraSettings
from vllm_slora.finetune.model_config import DecoderConfig
from vllm_slora.worker import SLoRAWorkerMixin

MIB = 1 << 20


def test_job_state_counts_the_lora_tensors_gradients_and_adamw_moments(tiny_model):
    config = DecoderConfig.from_hf(tiny_model)
    lora = LoraParams.init(config, LoraSettings(r=16, alpha=32.0))  # all seven projections
    assert memory.job_state_bytes(config, 16) == 4 * 4 * lora.num_parameters()


def test_loss_rows_fit_the_loss_units_share(tiny_model):
    config = DecoderConfig.from_hf(tiny_model)
    rows = memory.max_loss_rows(config)
    logits = memory.LOSS_TENSORS * memory.FP32_BYTES * config.vocab_size
    assert rows * logits <= memory.LOSS_UNIT_BYTES < (rows + 1) * logits


class _VLLMWorker:
    """Stands in for vLLM's platform worker: it has sized the KV cache at `available`."""

    available = 4096 * MIB

    def determine_available_memory(self) -> int:
        return self.available


class _Worker(SLoRAWorkerMixin, _VLLMWorker):
    def __init__(self, tiny_model, finetune: bool, explicit_kv: int | None, activation_mb: int = 256,
                 max_jobs: int = 2) -> None:
        from transformers import AutoConfig

        # Not SLoRAWorkerMixin.__init__: no vLLM worker is built, only what the method reads.
        self.slora_config = SLoRAConfig.from_dict({"finetune": finetune, "finetune_activation_mb": activation_mb,
                                                   "finetune_max_jobs": max_jobs})
        self.cache_config = types.SimpleNamespace(kv_cache_memory_bytes=explicit_kv)
        self.vllm_config = types.SimpleNamespace(
            model_config=types.SimpleNamespace(hf_config=AutoConfig.from_pretrained(tiny_model), max_model_len=512),
            lora_config=types.SimpleNamespace(max_lora_rank=16),
        )


@pytest.mark.parametrize("max_jobs", [1, 3])
@pytest.mark.parametrize("lent", [True, False], ids=["cpu-graphs-borrow-pool-blocks", "gpu-graphs-reserved"])
def test_a_finetune_engine_keeps_training_memory_out_of_the_kv_cache(tiny_model, monkeypatch, lent, max_jobs):
    """Each of the max_jobs jobs that may train at once: its micro-batch's boundaries and its
    LoRA + AdamW state; once: the recomputed layer, the loss unit and (GPU) the graphs."""
    from vllm_slora.pool import training_loan

    monkeypatch.setattr(training_loan, "graphs_borrow_pool_blocks", lambda: lent)
    config = DecoderConfig.from_hf(tiny_model)
    # A 512-token micro-batch (max_model_len) keeping no graph: boundaries + one layer recomputed
    # (at --max-lora-rank 16, with LoRA dropout: the most a job may ask).
    layer = layer_graph_bytes(512, config, lora_rank=16, dropout=True)
    recompute = max_jobs * activation_bytes(512, config, False) + layer
    reserve = ((0 if lent else 256 * MIB) + recompute + memory.LOSS_UNIT_BYTES
               + max_jobs * memory.job_state_bytes(config, 16))
    assert memory.recompute_bytes(config, 512, lora_rank=16, jobs=max_jobs) == recompute
    worker = _Worker(tiny_model, finetune=True, explicit_kv=None, max_jobs=max_jobs)
    assert worker.determine_available_memory() == 4096 * MIB - reserve
    # No training: vLLM's figure. An explicit --kv-cache-memory-bytes is the operator's.
    assert _Worker(tiny_model, finetune=False, explicit_kv=None).determine_available_memory() == 4096 * MIB
    assert _Worker(tiny_model, finetune=True, explicit_kv=4096 * MIB).determine_available_memory() == 4096 * MIB


def test_no_room_for_training_is_refused_at_start_naming_the_knobs(tiny_model, monkeypatch):
    from vllm_slora.pool import training_loan

    monkeypatch.setattr(training_loan, "graphs_borrow_pool_blocks", lambda: False)
    worker = _Worker(tiny_model, finetune=True, explicit_kv=None, activation_mb=8192)
    with pytest.raises(ValueError, match="max-lora-rank.*finetune_activation_mb=8192.*lower --max-lora-rank"):
        worker.determine_available_memory()
