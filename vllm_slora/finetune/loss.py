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

The LM head and the cross-entropy are one autograd function (`lm_head_cross_entropy`):
the logits ([rows, vocab] fp32, 50 MB for 256 rows of a 49k vocabulary; made
LM_HEAD_CHUNK_ROWS rows at a time) are written once, turned into the softmax in place and
then into d(loss)/d(logits) in place, and the gradient of the hidden rows is taken in the
forward, so the logits are freed before it returns. Autograd's linear + cross_entropy keeps the logits, their log-softmax and, in
backward, a third tensor of that size: ~20 % of the loss unit's time on 2 CPU cores went
to those memory passes and page faults, beside its two LM-head GEMMs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base_weights import BaseWeights
from .data import IGNORE_INDEX
from .forward import final_hidden
from .frozen_linear import linear_nt
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
    loss_sum = lm_head_cross_entropy(hidden[keep], base.lm_head, targets[keep])
    return loss_sum / (num_items if num_items is not None else count)


# Rows of logits made at once: 512 x a 49k vocabulary is 100 MB of fp32, and a GEMM of 512
# rows runs at full speed; a whole 2048-token micro-batch at once would take 400 MB.
LM_HEAD_CHUNK_ROWS = 512


class _LMHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`; the weight is frozen."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        grad = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=hidden.device) \
            if ctx.needs_input_grad[0] else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, LM_HEAD_CHUNK_ROWS):  # at most one chunk's logits alive
            stop = min(rows, start + LM_HEAD_CHUNK_ROWS)
            logits = linear_nt(hidden[start:stop], weight).to(torch.float32)  # [chunk, vocab]
            chunk_targets = targets[start:stop]
            target_logit = logits.gather(1, chunk_targets[:, None]).squeeze(1)  # [chunk]
            row_max = logits.amax(dim=1, keepdim=True)  # [chunk, 1]
            probs = logits.sub_(row_max).exp_()  # unnormalised, in place
            sum_exp = probs.sum(dim=1)  # [chunk]
            # log-sum-exp - target logit, per row: what F.cross_entropy computes.
            loss_sum += (row_max.squeeze(1) + sum_exp.log() - target_logit).sum()
            if grad is not None:
                probs.div_(sum_exp[:, None])  # softmax
                probs[torch.arange(stop - start, device=probs.device), chunk_targets] -= 1.0  # - one_hot
                grad[start:stop] = linear_nt(probs.to(weight.dtype), weight.t())  # [chunk, hidden]
            del logits, probs
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None


def lm_head_cross_entropy(
    hidden: torch.Tensor,  # [rows, hidden] (normed final hidden states)
    weight: torch.Tensor,  # [vocab, hidden] LM head, frozen
    targets: torch.Tensor,  # [rows] int64, every row a loss row
) -> torch.Tensor:  # scalar float32: the summed cross-entropy; differentiable in `hidden`
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1], (hidden.shape, weight.shape)
    assert targets.shape == (hidden.shape[0],), (targets.shape, hidden.shape)
    assert not weight.requires_grad, "the LM head is frozen: no gradient is computed for it"
    return _LMHeadCrossEntropy.apply(hidden, weight, targets)


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
