"""The training loss of a packed micro-batch: token-mean cross-entropy over loss tokens.

Averaging: the cross-entropy of every loss token of every packed sequence is summed and
divided by the number of loss tokens in the whole micro-batch (not a mean of per-sequence
means). This is what HF computes for a padded batch with `labels` (-100 on padding and
unmasked tokens), and what `ForCausalLMLoss` computes with `num_items_in_batch` = that
count, so long and short sequences weigh by their token counts. `num_items` lets a
caller that accumulates several micro-batches into one optimizer step divide by the
step's total instead.

Only the positions that have a target are sent through the LM head, so a chat micro-batch
with assistant-only loss never materialises logits for the prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .base_weights import BaseWeights
from .data import IGNORE_INDEX
from .forward import final_hidden
from .lora_params import LoraParams


def packed_loss(
    base: BaseWeights,
    lora: LoraParams | None,
    input_ids: torch.Tensor,  # [T] int64, packed sequences back to back
    seq_lens: Sequence[int],
    targets: torch.Tensor,  # [T] int64: the next token of the same sequence, IGNORE_INDEX where no loss
    num_items: int | None = None,
    checkpoint_layers: bool = False,
    training: bool = True,
) -> torch.Tensor:  # scalar float32
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        raise ValueError("the micro-batch has no loss tokens")
    hidden = final_hidden(base, lora, input_ids, seq_lens, checkpoint_layers, training)
    logits = F.linear(hidden[keep], base.lm_head).to(torch.float32)  # [count, vocab]
    loss_sum = F.cross_entropy(logits, targets[keep], reduction="sum")
    return loss_sum / (num_items if num_items is not None else count)


def validation_loss(base: BaseWeights, lora: LoraParams | None, batches: Sequence) -> tuple[float, int]:
    """Token-mean loss over every micro-batch of `batches` (PackedBatch; a validation set):
    no dropout, no autograd. Returns (loss, loss tokens)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            loss = packed_loss(base, lora, batch.input_ids, batch.seq_lens, batch.targets, training=False)
            total += float(loss) * batch.num_loss_tokens
            count += batch.num_loss_tokens
    return total / count, count
