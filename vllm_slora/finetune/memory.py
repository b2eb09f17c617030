"""Memory co-served training takes in a worker, and the share of it kept out of the KV cache.

vLLM sizes the KV cache at start-up from what the model left free (GPU: profiled peak;
CPU: the worker's share of RAM minus its RSS). Training allocates later, outside the
pool, so without a reservation its first micro-batch would take memory the KV cache was
promised: a CUDA OOM (the job fails) or, on CPU, the OS's OOM killer (the engine dies).
The worker therefore subtracts `training_reserve_bytes` from what it reports for the KV
cache when the size is derived (not when the operator gives --kv-cache-memory-bytes:
that size is theirs), and training stays inside it:

* a micro-batch's layer boundaries plus one recomputed layer's working set, for the
  longest micro-batch a job makes by default (``min(2048, max_model_len)`` tokens): what a
  pass needs when it keeps no layer graph;
* the layer graphs kept from forward to backward (no recompute): ``slora.finetune_activation_mb``,
  shared by every job's micro-batch in flight, on GPU only. A CPU engine lends its graphs
  pool blocks instead while the KV cache can spare them and calls them back under KV
  pressure (pool/training_loan.py), so nothing is reserved for them there;
* one LOSS unit's logits (their gradient is made in place): at most ``LOSS_UNIT_BYTES`` (its rows are
  capped to fit);
* one job's trainable state at ``--max-lora-rank`` on all seven projections: the LoRA
  A/B, their gradients and AdamW's two moments, fp32 (about 78 MiB at rank 16 on the 135M
  default model).

The micro-batch boundaries and the state are per job: ``slora.finetune_max_jobs`` jobs
train at once (the planner makes any more wait, finetune/coserve_planner.py), so they are
kept that many times; the recomputed layer and the loss unit run one at a time.
"""

from __future__ import annotations

from ..adapters.modules import SLICE_ORDER
from .layer_units import layer_graph_bytes, pass_bytes
from .model_config import DecoderConfig

FP32_BYTES = 4
# Trainable tensors per LoRA element: the parameter, its gradient, AdamW's exp_avg and exp_avg_sq.
STATE_COPIES = 4
# [rows, vocab] fp32 tensors alive at a LOSS unit's peak (finetune/loss.py): its logits,
# turned into their gradient in place; with a bf16 LM head, half as much again for the
# bf16 logits before the cast or the bf16 gradient before the GEMM. 2 bounds both.
LOSS_TENSORS = 2
LOSS_UNIT_BYTES = 192 << 20
DEFAULT_MICRO_BATCH_TOKENS = 2048  # a job's batch_tokens default (finetune/jobs.py), at most max_model_len


def job_state_bytes(config: DecoderConfig, rank: int) -> int:
    """Bytes of one job's LoRA parameters, gradients and AdamW moments (all seven projections)."""
    per_layer = sum(sum(config.features(projection)) for projection in SLICE_ORDER) * rank
    return STATE_COPIES * FP32_BYTES * per_layer * config.num_layers


def max_loss_rows(config: DecoderConfig) -> int:
    """Loss rows one LOSS unit may take so that its logits stay within LOSS_UNIT_BYTES."""
    return max(1, LOSS_UNIT_BYTES // (LOSS_TENSORS * FP32_BYTES * config.vocab_size))


def recompute_bytes(config: DecoderConfig, num_tokens: int, lora_rank: int = 0, jobs: int = 1) -> int:
    """`jobs` passes of `num_tokens` that keep no graph: their layer boundaries, plus one layer's
    graph while a BWD unit recomputes it (at `lora_rank`, with LoRA dropout: the most a job may ask)."""
    return jobs * pass_bytes(num_tokens, config, 0) + layer_graph_bytes(num_tokens, config, lora_rank, dropout=True)


def default_micro_batch_tokens(max_model_len: int) -> int:
    return min(DEFAULT_MICRO_BATCH_TOKENS, max_model_len)


def training_reserve_bytes(config: DecoderConfig, max_lora_rank: int, activation_budget_bytes: int,
                           max_model_len: int, graphs_lent: bool, max_jobs: int = 1) -> int:
    """What the worker keeps out of the KV cache for co-served training (see the module doc)."""
    graphs = 0 if graphs_lent else activation_budget_bytes
    tokens = default_micro_batch_tokens(max_model_len)
    return (graphs + recompute_bytes(config, tokens, max_lora_rank, jobs=max_jobs) + LOSS_UNIT_BYTES
            + max_jobs * job_state_bytes(config, max_lora_rank))
