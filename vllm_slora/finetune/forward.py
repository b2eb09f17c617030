"""A functional Llama decoder forward for training LoRA on frozen vLLM-layout base weights.

vLLM's model `forward()` cannot be trained through (inference mode, in-place fused norm
and rotary ops, paged attention without backward, KV-cache writes), so training runs this
plain-torch forward instead, over the same base tensors (`base_weights.py`) and LoRA
parameters (`lora_params.py`). Only the LoRA A/B get gradients. Every op is out of place.

Packing: a micro-batch is one row of T tokens holding several sequences back to back.
Positions restart at 0 per sequence and attention is causal *within* each sequence, so
every sequence computes exactly what it would alone and no padding is spent. Attention
runs per sequence (equal lengths batched), not as one [T, T] block-diagonal mask: a
dense mask over 8 packed 256-token sequences costs 8x the attention work, and on 2 CPU
cores made a 2048-token micro-batch train at 110 tokens/s against 171 for one sequence.

Each decoder layer is a separate function of (hidden [T, hidden], weights) so that later
work can run layers as separately scheduled units (research/flexllm.md §4.2); here
`checkpoint_layers=True` recomputes each layer in backward (torch.utils.checkpoint),
keeping only the layer-boundary activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .base_weights import (  # noqa: F401  (re-exported: the forward's weight sources)
    BaseWeights,
    LayerWeights,
    base_weights_from_checkpoint,
    base_weights_from_hf,
    base_weights_from_vllm,
)
from .frozen_linear import frozen_linear
from .lora_params import LoraModule, LoraParams
from .model_config import DecoderConfig
from .rope import apply_rope, inverse_frequencies, rope_cos_sin


@dataclass
class PackedLayout:
    """Where the sequences of a packed micro-batch lie, and what that means for attention."""

    seq_lens: tuple[int, ...]
    position_ids: torch.Tensor  # [T] int64, restarting at 0 for every sequence
    cos: torch.Tensor  # [T, head_dim]
    sin: torch.Tensor  # [T, head_dim]

    @classmethod
    def build(cls, seq_lens: Sequence[int], config: DecoderConfig, dtype: torch.dtype, device) -> PackedLayout:
        lens = torch.tensor(list(seq_lens), dtype=torch.int64, device=device)
        if len(seq_lens) == 0 or bool((lens <= 0).any()):
            raise ValueError(f"a packed micro-batch needs sequences of positive length, got {list(seq_lens)}")
        total = int(lens.sum())
        seq_id = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), lens)
        starts = torch.cumsum(lens, 0) - lens
        position_ids = torch.arange(total, device=device) - starts[seq_id]
        cos, sin = rope_cos_sin(inverse_frequencies(config.rope, config.head_dim), position_ids, dtype)
        return cls(tuple(int(n) for n in seq_lens), position_ids, cos, sin)


def rms_norm(
    x: torch.Tensor,  # [T, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:
    # Normalise in float32 and scale in the input dtype, as HF Llama and vLLM's native op do.
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def lora_delta(
    x: torch.Tensor,  # [T, in_features]
    module: LoraModule,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:  # [T, out_features]
    """PEFT's LoRA term: (dropout(x) @ A^T) @ B^T * scaling (A/B cast to the compute dtype)."""
    if dropout and training:
        x = F.dropout(x, dropout, training=True)
    return F.linear(F.linear(x, module.a.to(x.dtype)), module.b.to(x.dtype)) * module.scaling


def fused_projection(
    x: torch.Tensor,  # [T, in_features]
    weight: torch.Tensor,  # [sum(out sizes), in_features], vLLM's fused layout
    parts: Sequence[tuple[str, int]],  # (projection name, out rows) in weight row order
    lora: dict[str, LoraModule],
    dropout: float,
    training: bool,
) -> list[torch.Tensor]:  # one [T, out] per part
    """One GEMM over the fused base weight plus every targeted part's LoRA delta.

    Without dropout the parts' deltas are fused too: the parts share the input x, so one
    GEMM x @ [A_1; A_2; ..]^T gives every part's rank rows, and one addmm adds
    (x A^T) @ blockdiag(s B_1, s B_2, ..)^T into the base output (a part without LoRA gets
    an empty block, i.e. zero rows). That is 2 GEMMs per fused weight instead of 2 GEMMs,
    a scale and an add over [T, out] per part (about a tenth of a training pass on CPU),
    and the same sum as PEFT's (x A^T) B^T * s up to rounding. With dropout, PEFT draws a
    separate mask per part, so each part keeps its own delta.
    """
    base = frozen_linear(x, weight)  # oneDNN on CPU (frozen_linear.py)
    sizes = [size for _, size in parts]
    modules = [lora.get(name) for name, _ in parts]
    if not any(modules):
        return list(torch.split(base, sizes, dim=-1))
    if dropout and training:
        outputs = torch.split(base, sizes, dim=-1)
        return [out if m is None else out + lora_delta(x, m, dropout, training) for m, out in zip(modules, outputs)]
    dtype = x.dtype
    a = torch.cat([m.a.to(dtype) for m in modules if m is not None])  # [sum r, in]
    blocks = [
        (m.b.to(dtype) * m.scaling) if m is not None else x.new_zeros(size, 0)
        for m, size in zip(modules, sizes)
    ]
    b = torch.block_diag(*blocks)  # [sum(out sizes), sum r]
    out = torch.addmm(base, F.linear(x, a), b.t())
    return list(torch.split(out, sizes, dim=-1))


def attention(
    q: torch.Tensor,  # [T, num_heads * head_dim]
    k: torch.Tensor,  # [T, num_kv_heads * head_dim]
    v: torch.Tensor,  # [T, num_kv_heads * head_dim]
    layout: PackedLayout,
    config: DecoderConfig,
) -> torch.Tensor:  # [T, num_heads * head_dim]
    tokens, d = q.shape[0], config.head_dim
    q = apply_rope(q.view(tokens, config.num_heads, d).transpose(0, 1), layout.cos, layout.sin)
    k = apply_rope(k.view(tokens, config.num_kv_heads, d).transpose(0, 1), layout.cos, layout.sin)
    v = v.view(tokens, config.num_kv_heads, d).transpose(0, 1)
    group = config.num_heads // config.num_kv_heads
    if group > 1:  # GQA: query head h reads kv head h // group
        k = k.repeat_interleave(group, dim=0)
        v = v.repeat_interleave(group, dim=0)
    lens = layout.seq_lens
    if len(set(lens)) == 1:  # one sequence, or equal lengths: one causal call over [sequences, heads, len, d]
        n, length = len(lens), lens[0]
        q, k, v = (t.reshape(t.shape[0], n, length, d).transpose(0, 1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # default scale 1/sqrt(head_dim)
        return out.transpose(1, 2).reshape(tokens, config.q_size)
    outs = [
        F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True)[0]
        for qs, ks, vs in zip(q.split(lens, dim=1), k.split(lens, dim=1), v.split(lens, dim=1))
    ]  # [heads, len, head_dim] each
    return torch.cat(outs, dim=1).transpose(0, 1).reshape(tokens, config.q_size)


def attention_block(
    hidden: torch.Tensor,  # [T, hidden]
    weights: LayerWeights,
    lora: dict[str, LoraModule],
    layout: PackedLayout,
    config: DecoderConfig,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:  # [T, hidden]: hidden + self-attention(norm(hidden))
    x = rms_norm(hidden, weights.input_norm, config.rms_norm_eps)
    qkv_parts = (("q_proj", config.q_size), ("k_proj", config.kv_size), ("v_proj", config.kv_size))
    q, k, v = fused_projection(x, weights.qkv, qkv_parts, lora, dropout, training)
    (o,) = fused_projection(attention(q, k, v, layout, config), weights.o, (("o_proj", config.hidden_size),), lora, dropout, training)
    return hidden + o


def mlp_block(
    hidden: torch.Tensor,  # [rows, hidden]: any rows of a micro-batch (the block works row by row)
    weights: LayerWeights,
    lora: dict[str, LoraModule],
    config: DecoderConfig,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:  # [rows, hidden]: hidden + MLP(norm(hidden))
    x = rms_norm(hidden, weights.post_attention_norm, config.rms_norm_eps)
    size = config.intermediate_size
    gate, up = fused_projection(x, weights.gate_up, (("gate_proj", size), ("up_proj", size)), lora, dropout, training)
    (down,) = fused_projection(F.silu(gate) * up, weights.down, (("down_proj", config.hidden_size),), lora, dropout, training)
    return hidden + down


def decoder_layer(
    hidden: torch.Tensor,  # [T, hidden]
    weights: LayerWeights,
    lora: dict[str, LoraModule],
    layout: PackedLayout,
    config: DecoderConfig,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:  # [T, hidden]
    hidden = attention_block(hidden, weights, lora, layout, config, dropout, training)
    return mlp_block(hidden, weights, lora, config, dropout, training)


def final_hidden(
    base: BaseWeights,
    lora: LoraParams | None,
    input_ids: torch.Tensor,  # [T] int64, the packed sequences back to back
    seq_lens: Sequence[int],  # lengths of the packed sequences, summing to T
    checkpoint_layers: bool = False,
    training: bool = False,
) -> torch.Tensor:  # [T, hidden], after the final norm
    config = base.config
    if int(sum(seq_lens)) != input_ids.shape[0]:
        raise ValueError(f"seq_lens sum to {sum(seq_lens)} but input_ids has {input_ids.shape[0]} tokens")
    layout = PackedLayout.build(seq_lens, config, base.dtype, input_ids.device)
    dropout = lora.settings.dropout if lora is not None else 0.0
    hidden = F.embedding(input_ids, base.embed_tokens)
    for index, weights in enumerate(base.layers):
        layer_lora = lora.layer(index) if lora is not None else {}
        if checkpoint_layers and torch.is_grad_enabled():
            hidden = checkpoint(
                decoder_layer, hidden, weights, layer_lora, layout, config, dropout, training, use_reentrant=False
            )
        else:
            hidden = decoder_layer(hidden, weights, layer_lora, layout, config, dropout, training)
    return rms_norm(hidden, base.norm, config.rms_norm_eps)


def forward_logits(
    base: BaseWeights,
    lora: LoraParams | None,
    input_ids: torch.Tensor,  # [T] int64
    seq_lens: Sequence[int] | None = None,  # None: one sequence
    checkpoint_layers: bool = False,
) -> torch.Tensor:  # [T, vocab]
    """Logits of every position (for tests and evaluation; training uses `packed_loss`)."""
    seq_lens = [input_ids.shape[0]] if seq_lens is None else seq_lens
    hidden = final_hidden(base, lora, input_ids, seq_lens, checkpoint_layers)
    return frozen_linear(hidden, base.lm_head)
