"""One micro-batch's forward + backward as a sequence of small work units (co-serving).

The engine gives training only the time inference leaves (research/flexllm.md §4.2), so
a training step must stop and resume at fine grain: a step that runs a unit grows by the
whole unit. A decoder layer is two blocks, attention and MLP (about a quarter and three
quarters of its FLOPs), and the MLP works row by row, so its units take any number of
rows. A micro-batch of T packed tokens on an L-layer decoder runs as:

    FWD_ATTN(l)  layer l's attention block from its input h_l (no graph kept): stores the
                 block's output m_l                                    l = 0 .. L-1,
    FWD_MLP(l)   layer l's MLP block on the next `rows` rows of m_l    each in turn
                 (as many units as it takes): stores h_{l+1}
    LOSS         final norm + LM head + cross-entropy of the next `rows` loss tokens (the
                 LM head is the largest GEMM), backward to their rows of dL/dh_L; or, when
                 the caller gives `vocab`, the first LOSS_SLICE unit of those rows:
    LOSS_SLICE   the same rows against the next `vocab` columns of the LM head: first every
                 slice's logits (kept, [rows, vocab] fp32, with a running log-sum-exp), then
                 every slice's softmax gradient into dL/d(normed rows), then back through
                 the norm. A row-chunked LOSS unit reads the whole LM head (its ~57 MFLOP a
                 row and 113 MB on the default model), so it cannot be made short: 8 rows
                 still took ~25 ms on 2 cores; a slice of 1024 columns takes a few ms
    BWD_MLP(l)   recompute the MLP block on the next rows of m_l with autograd and backprop
                 dL/dh_{l+1} to dL/dm_l                                l = L-1 .. 0,
    BWD_ATTN(l)  recompute the attention block from h_l, backprop dL/dm_l to dL/dh_l   each in turn
                 (LoRA A/B of the block accumulate their gradients in both)

This is activation checkpointing at block granularity: only the 2L+1 boundaries
([T, hidden] each) live between units, never a block's graph. Attention units see the
whole micro-batch (causal attention mixes its rows), so training needs no KV cache.
An idle engine asks for all rows at once (one unit per block: the GEMMs keep T rows);
a loaded one asks for as few rows as fit the time it may add to the step.

With ``keep_graph=True`` (when the micro-batch's activations fit the memory the engine
grants training) the forward units keep their blocks' autograd graphs instead, cut off
from the blocks around them, and the backward units only backpropagate through them (the
MLP one chunk of rows per unit, as the forward made them): no recompute, about a quarter
less work per step, and the units stay just as preemptible. When the memory granted
holds only some layers' graphs, ``graph_layers=k`` keeps those of the top k layers and
recomputes the others: each kept layer saves its recompute, so a budget short of the
whole pass still buys its share of the speed (rather than none). The top layers are the
ones kept because their graphs are freed first in backward.

The gradients equal those of `packed_loss(...).backward()` (the same ops in the same
order, split at block and row boundaries: only the LoRA gradients' sums over rows are
added up in another order). LoRA dropout: each forward block runs on the unit's own
random stream, saved so that the backward replays the very same masks (so with dropout
an MLP block always takes all its rows at once: its masks are one draw); the engine's
global random state (inference sampling) is never advanced by training.

``evaluate=True`` makes the same units a validation pass: the forward units without
autograd and without LoRA dropout (each boundary is freed once the next block has read
it), then the LOSS / LOSS_SLICE units of the loss alone (a slice group ends after its
first phase, the logits and their log-sum-exp); no backward, and the LoRA gradients are
not touched. ``loss`` is then the micro-batch's token-mean cross-entropy, as `packed_loss`
with ``training=False`` computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base_weights import BaseWeights
from .data import IGNORE_INDEX
from .forward import PackedLayout, attention_block, mlp_block, rms_norm
from .frozen_linear import linear_nt
from .lora_params import LoraParams
from .loss import lm_head_cross_entropy
from .packing import PackedBatch

FWD_ATTN, FWD_MLP, LOSS, BWD_MLP, BWD_ATTN = "fwd_attn", "fwd_mlp", "loss", "bwd_mlp", "bwd_attn"
LOSS_SLICE = "loss_slice"
ROW_KINDS = (FWD_MLP, LOSS, BWD_MLP)  # units that take a number of rows
LOSS_CHUNK = 32  # loss tokens per LOSS unit by default: the LM head's GEMM is split to keep units short
MLP_CHUNK = 64  # rows of the shortest MLP unit a loaded engine asks for
VOCAB_CHUNK = 1024  # LM head columns of the shortest LOSS_SLICE unit a loaded engine asks for


@dataclass
class _LossSlices:
    """A group of loss rows whose cross-entropy runs slice by slice of the vocabulary."""

    rows: torch.Tensor  # [R] int64, micro-batch rows
    normed: torch.Tensor  # [R, hidden], final norm of those rows, with its graph to h_L
    logits: torch.Tensor  # [R, vocab] fp32, filled slice by slice
    max: torch.Tensor  # [R] fp32, running max of the logits so far
    sum_exp: torch.Tensor  # [R] fp32, running sum of exp(logit - max)
    grad: torch.Tensor | None = None  # [R, hidden] fp32, dL/dnormed so far (second phase)
    lse: torch.Tensor | None = None  # [R] fp32, log-sum-exp (after the first phase)
    columns_done: int = 0  # of the phase in progress


class LayerSlicedPass:
    """Forward + backward of one packed micro-batch, one unit per `run_unit` call.

    Gradients accumulate into the LoRA parameters' ``.grad`` (the caller zeroes them
    before the first unit and steps the optimizer after the last). Units must run outside
    inference mode with grad enabled (`run_unit` enters both itself).
    """

    def __init__(
        self,
        base: BaseWeights,
        lora: LoraParams,
        batch: PackedBatch,
        rng_state: torch.Tensor | None = None,  # CPU generator state for LoRA dropout
        keep_graph: bool = False,  # keep each layer's graph from FWD to BWD (no recompute)
        graph_layers: int | None = None,  # keep only the top this many layers' graphs (overrides keep_graph)
        evaluate: bool = False,  # a validation pass: forward and loss only (see the module doc)
        # The loss is the token sum over this micro-batch divided by this many tokens (default:
        # its own loss tokens). An optimizer step of several micro-batches gives the step's
        # total, so the gradients they accumulate are those of the whole step's token mean.
        loss_tokens: int | None = None,
    ) -> None:
        self.base, self.lora, self.batch = base, lora, batch
        self.num_layers = len(base.layers)
        device = base.embed_tokens.device
        self.input_ids = batch.input_ids.to(device)
        self.targets = batch.targets.to(device)
        self.num_tokens = int(self.input_ids.shape[0])
        self.keep = self.targets != IGNORE_INDEX
        self.num_loss_tokens = int(self.keep.sum())
        if self.num_loss_tokens == 0:
            raise ValueError("the micro-batch has no loss tokens")
        self.loss_divisor = self.num_loss_tokens if loss_tokens is None else loss_tokens
        if self.loss_divisor < self.num_loss_tokens:
            raise ValueError(f"loss_tokens {loss_tokens} is fewer than the micro-batch's {self.num_loss_tokens}")
        self._loss_index = self.keep.nonzero().squeeze(1)  # rows with a loss, in order
        self._loss_done = 0  # of them, how many LOSS units have covered
        self._loss_sum: torch.Tensor | None = None
        self._slices: _LossSlices | None = None  # a LOSS_SLICE group in progress
        self.last_unit_columns = 0  # LM head columns of the last LOSS_SLICE unit
        self.last_unit_cells = 0  # ... times its rows
        self.evaluate = evaluate
        self.dropout = 0.0 if evaluate else lora.settings.dropout
        self._rng = rng_state
        self._block_rng: list[torch.Tensor | None] = [None] * (2 * self.num_layers)  # attention, MLP of each layer
        self._layout: PackedLayout | None = None
        self._boundaries: list[torch.Tensor | None] = []  # h_0, m_0, h_1, m_1 .. h_L, detached
        if graph_layers is None or evaluate:
            graph_layers = self.num_layers if keep_graph and not evaluate else 0
        if not 0 <= graph_layers <= self.num_layers:
            raise ValueError(f"graph_layers must be in [0, {self.num_layers}], got {graph_layers}")
        self.graph_layers = graph_layers
        self.planned_graph_layers = graph_layers  # at the start (graph_layers shrinks if graphs are dropped)
        # Kept layers' block outputs with their graphs: the attention block's, and the MLP
        # block's per chunk of rows (start, stop, output), in row order.
        self._attn_graph: list[torch.Tensor | None] = [None] * self.num_layers
        self._mlp_graphs: list[list[tuple[int, int, torch.Tensor]]] = [[] for _ in range(self.num_layers)]
        self._rows_done = 0  # rows of the MLP block in progress that its units have covered
        self._mlp_out: torch.Tensor | None = None  # h_{l+1} being filled chunk by chunk
        self._grad: torch.Tensor | None = None  # dL/d(the boundary above the next backward unit)
        self._next: tuple[str, int] | None = (FWD_ATTN, 0)
        self.last_unit_rows = 0  # rows the last row-wise unit covered
        self.loss: float | None = None

    @property
    def num_units(self) -> int:
        """Units of the pass with whole-block MLP units and LOSS_CHUNK-row LOSS units."""
        return 4 * self.num_layers + -(-self.num_loss_tokens // LOSS_CHUNK)

    @property
    def loss_rows_left(self) -> int:
        return self.num_loss_tokens - self._loss_done

    @property
    def loss_slice_rows(self) -> int:
        """Rows of the LOSS_SLICE group in progress (0: none)."""
        return 0 if self._slices is None else self._slices.rows.numel()

    @property
    def next_kind(self) -> str | None:
        """Kind of the next unit (FWD_ATTN .. BWD_ATTN, LOSS_SLICE while a group of loss rows
        is in slices), None when the pass is complete."""
        if self._slices is not None:
            return LOSS_SLICE
        return None if self._next is None else self._next[0]

    @property
    def done(self) -> bool:
        return self._next is None

    @property
    def keep_graph(self) -> bool:
        """Whether any layer keeps its graph from FWD to BWD."""
        return self.graph_layers > 0

    def _keeps(self, layer: int) -> bool:
        return layer >= self.num_layers - self.graph_layers

    def chunk_output_bytes(self) -> int:
        """Bytes kept layers whose MLP ran in row chunks hold beyond `pass_bytes`: each chunk's
        output, held to backpropagate from (a whole block's output is the next boundary
        itself; chunks' are copied into it), and every chunk after the first its own fused
        LoRA A / B of the MLP's weights (forward.fused_projection)."""
        whole = (0, self.num_tokens)
        total = 0
        for layer, graphs in enumerate(self._mlp_graphs):
            chunks = [out for start, stop, out in graphs if (start, stop) != whole]
            if chunks:
                total += sum(out.numel() * out.element_size() for out in chunks)
                total += (len(chunks) - 1) * self._mlp_lora_bytes(layer)
        return total

    def chunking_bytes(self, rows: int) -> int:
        """What `chunk_output_bytes` grows by when the next MLP block runs in `rows`-row units."""
        layer = self._next[1] if self._next is not None else 0
        chunks = -(-self.num_tokens // max(1, rows))
        return 4 * self.num_tokens * self.base.config.hidden_size + (chunks - 1) * self._mlp_lora_bytes(layer)

    def _mlp_lora_bytes(self, layer: int) -> int:
        ranks = {name: module.rank for name, module in self.lora.layer(layer).items()}
        return fused_lora_bytes(self.base.config, ranks, ("gate_proj", "down_proj"))

    @property
    def next_mlp_keeps_graph(self) -> bool:
        """The next unit is a forward MLP unit of a layer that keeps its graph."""
        return self._next is not None and self._next[0] == FWD_MLP and self._keeps(self._next[1])

    def holds_graph(self, layer: int) -> bool:
        """Whether some block of `layer` holds its autograd graph now."""
        return self._attn_graph[layer] is not None or bool(self._mlp_graphs[layer])

    def run_unit(self, rows: int | None = None, vocab: int | None = None) -> str:
        """Run the next unit; returns its kind. A row-wise unit (ROW_KINDS) covers the next
        `rows` rows of its block: for LOSS, loss tokens (default LOSS_CHUNK), for the MLP
        units, tokens (default all). Fewer rows make a shorter unit, more rows a faster
        GEMM per row (on 2 CPU cores the LM head runs ~1.7x faster per row at 256 rows than
        at 32), so an idle engine asks for them all at once. `vocab` (LOSS, LOSS_SLICE):
        run the loss of those rows in slices of that many LM head columns instead."""
        if self._next is None:
            raise RuntimeError("the pass is complete")
        kind, layer = self._next
        last = self.num_layers - 1
        after_loss = None if self.evaluate else (BWD_MLP, last)
        with torch.inference_mode(False), torch.set_grad_enabled(not self.evaluate):
            if self._slices is not None or (kind == LOSS and vocab is not None):
                if self._loss_slice(rows, vocab or VOCAB_CHUNK) and self._loss_done == self.num_loss_tokens:
                    self._next = after_loss
                return LOSS_SLICE
            if kind == FWD_ATTN:
                self._forward_attention(layer)
                self._next = (FWD_MLP, layer)
            elif kind == FWD_MLP:
                if self._forward_mlp(layer, rows):
                    self._next = (FWD_ATTN, layer + 1) if layer < last else (LOSS, 0)
            elif kind == LOSS:
                self._loss(max(1, LOSS_CHUNK if rows is None else rows))
                if self._loss_done == self.num_loss_tokens:
                    self._next = after_loss
            elif kind == BWD_MLP:
                if self._backward_mlp(layer, rows):
                    self._next = (BWD_ATTN, layer)
            else:
                self._backward_attention(layer)
                self._next = (BWD_MLP, layer - 1) if layer > 0 else None
        return kind

    # -- units -----------------------------------------------------------------------------
    @contextmanager
    def _stream(self, block: int, replay: bool):
        """The LoRA dropout stream of `block` (2 * layer + 0 attention / 1 MLP): in forward,
        from where the previous block left it (its start saved); in backward, that start again."""
        if not self.dropout:
            yield
            return
        if not replay:
            self._block_rng[block] = self._rng if self._rng is not None else torch.get_rng_state()
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._block_rng[block])
            yield
            if not replay:
                self._rng = torch.get_rng_state()

    def _attention(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return attention_block(hidden, self.base.layers[layer], self.lora.layer(layer), self._layout,
                               self.base.config, self.dropout, training=not self.evaluate)

    def _mlp(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return mlp_block(hidden, self.base.layers[layer], self.lora.layer(layer), self.base.config,
                         self.dropout, training=not self.evaluate)

    def _row_range(self, rows: int | None) -> tuple[int, int]:
        """The rows of the MLP block in progress a unit of `rows` rows covers (all with dropout)."""
        start = self._rows_done
        stop = self.num_tokens if rows is None or self.dropout else min(self.num_tokens, start + max(1, rows))
        self.last_unit_rows = stop - start
        return start, stop

    def _forward_attention(self, layer: int) -> None:
        if layer == 0:
            self._layout = PackedLayout.build(self.batch.seq_lens, self.base.config, self.base.dtype,
                                              self.input_ids.device)
            self._boundaries = [F.embedding(self.input_ids, self.base.embed_tokens).detach()]
        hidden = self._boundaries[2 * layer]
        keep = self._keeps(layer)
        if keep and layer > 0:
            hidden.requires_grad_(True)  # the cut between this layer's graph and the one below
        with torch.set_grad_enabled(keep), self._stream(2 * layer, replay=False):
            out = self._attention(layer, hidden)
        if keep:
            self._attn_graph[layer] = out
            out = out.detach()
        self._boundaries.append(out)
        if self.evaluate:  # no backward will need h_l
            self._boundaries[2 * layer] = None

    def _forward_mlp(self, layer: int, rows: int | None) -> bool:
        """One FWD_MLP unit; True when the block is complete."""
        mid = self._boundaries[2 * layer + 1]
        start, stop = self._row_range(rows)
        whole = (start, stop) == (0, self.num_tokens)
        keep = self._keeps(layer)
        if keep:
            mid.requires_grad_(True)
        with torch.set_grad_enabled(keep), self._stream(2 * layer + 1, replay=False):
            out = self._mlp(layer, mid if whole else mid[start:stop])
        if keep:
            self._mlp_graphs[layer].append((start, stop, out))
            out = out.detach()
        if whole:
            self._boundaries.append(out)
        else:
            if start == 0:
                self._mlp_out = mid.new_empty(mid.shape)
            self._mlp_out[start:stop] = out
            if stop == self.num_tokens:
                self._boundaries.append(self._mlp_out)
                self._mlp_out = None
        self._rows_done = 0 if stop == self.num_tokens else stop
        if self.evaluate and stop == self.num_tokens:  # no backward will need m_l
            self._boundaries[2 * layer + 1] = None
        return stop == self.num_tokens

    def _loss(self, num_rows: int) -> None:
        top = self._boundaries[2 * self.num_layers]
        if not self.evaluate:
            top.requires_grad_(True)
        rows = self._loss_index[self._loss_done:self._loss_done + num_rows]
        self._loss_done += rows.numel()
        self.last_unit_rows = rows.numel()
        # rms_norm is per row: normalising only this chunk's rows is the same computation.
        hidden = rms_norm(top[rows], self.base.norm, self.base.config.rms_norm_eps)
        loss = lm_head_cross_entropy(hidden, self.base.lm_head, self.targets[rows]) / self.loss_divisor
        if not self.evaluate:
            loss.backward()  # accumulates into top.grad, row by row
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        if self._loss_done == self.num_loss_tokens:
            self.loss = float(self._loss_sum)
            self._grad = top.grad
            self._boundaries[2 * self.num_layers] = None

    def _loss_slice(self, rows: int | None, columns: int) -> bool:
        """One LOSS_SLICE unit; True when its group of rows is complete."""
        weight = self.base.lm_head  # [vocab, hidden]
        vocab = weight.shape[0]
        group = self._slices
        if group is None:  # a new group: the next `rows` loss rows, normalised once
            top = self._boundaries[2 * self.num_layers]
            if not self.evaluate:
                top.requires_grad_(True)
            index = self._loss_index[self._loss_done:self._loss_done + max(1, rows or self.num_loss_tokens)]
            normed = rms_norm(top[index], self.base.norm, self.base.config.rms_norm_eps)
            count = index.numel()
            group = self._slices = _LossSlices(
                index, normed, torch.empty(count, vocab, dtype=torch.float32, device=normed.device),
                torch.full((count,), float("-inf"), device=normed.device),
                torch.zeros(count, device=normed.device))
        start = group.columns_done
        stop = min(vocab, start + max(1, columns))
        self.last_unit_columns = stop - start
        self.last_unit_cells = group.rows.numel() * self.last_unit_columns
        part = weight[start:stop]
        if group.lse is None:  # first phase: logits and the running log-sum-exp
            with torch.no_grad():
                logits = group.logits[:, start:stop]
                logits.copy_(linear_nt(group.normed.detach(), part))
                new_max = torch.maximum(group.max, logits.max(dim=1).values)
                group.sum_exp.mul_(torch.exp(group.max - new_max)).add_(torch.exp(logits - new_max[:, None]).sum(dim=1))
                group.max = new_max
            group.columns_done = stop
            if stop == vocab:
                group.lse = group.max + torch.log(group.sum_exp)
                targets = self.targets[group.rows]
                loss = (group.lse - group.logits.gather(1, targets[:, None]).squeeze(1)).sum() / self.loss_divisor
                self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
                if self.evaluate:  # the loss is all a validation pass wants: the group ends here
                    return self._end_slice_group()
                group.grad = torch.zeros(group.rows.numel(), weight.shape[1], dtype=torch.float32,
                                         device=weight.device)
                group.columns_done = 0
            return False
        # Second phase: d(cross-entropy)/dlogits = softmax - one_hot(target), this slice's columns.
        with torch.no_grad():
            probs = group.logits[:, start:stop].sub_(group.lse[:, None]).exp_()
            targets = self.targets[group.rows]
            hit = (targets >= start) & (targets < stop)
            probs[hit.nonzero().squeeze(1), targets[hit] - start] -= 1.0
            group.grad.add_(linear_nt(probs.to(part.dtype), part.t()).to(torch.float32))
        group.columns_done = stop
        if stop < vocab:
            return False
        group.normed.backward((group.grad / self.loss_divisor).to(group.normed.dtype))
        return self._end_slice_group()

    def _end_slice_group(self) -> bool:
        self._loss_done += self._slices.rows.numel()
        self._slices = None
        if self._loss_done == self.num_loss_tokens:
            self.loss = float(self._loss_sum)
            self._grad = self._boundaries[2 * self.num_layers].grad
            self._boundaries[2 * self.num_layers] = None
        return True

    def _backward_mlp(self, layer: int, rows: int | None) -> bool:
        """One BWD_MLP unit (dL/dh_{l+1} -> dL/dm_l); True when the block is complete."""
        mid = self._boundaries[2 * layer + 1]
        if self._mlp_graphs[layer]:  # kept: the next chunk of rows the forward made
            start, stop, out = self._mlp_graphs[layer].pop(0)
            self.last_unit_rows = stop - start
        else:
            start, stop = self._row_range(rows)
            mid.requires_grad_(True)
            with self._stream(2 * layer + 1, replay=True):
                out = self._mlp(layer, mid if (start, stop) == (0, self.num_tokens) else mid[start:stop])
        out.backward(self._grad if (start, stop) == (0, self.num_tokens) else self._grad[start:stop])
        if stop < self.num_tokens:
            self._rows_done = stop
            return False
        self._rows_done = 0
        self._grad = mid.grad
        self._boundaries[2 * layer + 2] = None
        return True

    def _backward_attention(self, layer: int) -> None:
        hidden = self._boundaries[2 * layer]
        out, self._attn_graph[layer] = self._attn_graph[layer], None
        if out is None:  # recompute
            if layer > 0:  # the embedding is frozen: no gradient below layer 0
                hidden.requires_grad_(True)
            with self._stream(2 * layer, replay=True):
                out = self._attention(layer, hidden)
        out.backward(self._grad)
        self._grad = hidden.grad if layer > 0 else None
        self._boundaries[2 * layer + 1] = None
        self._boundaries[2 * layer] = None

    def drop_graphs(self, keep_layers: int = 0) -> None:
        """Keep at most the top `keep_layers` layers' graphs, from any unit boundary on (the
        memory of the others is wanted back): the graphs of the layers below are freed, the
        rest of the pass runs as if it had never kept them (their backward units recompute
        the blocks from their boundaries, replaying the same dropout masks), and the
        gradients stay the same."""
        self.graph_layers = max(0, min(self.graph_layers, keep_layers))
        for layer in range(self.num_layers - self.graph_layers):
            self._attn_graph[layer] = None
            self._mlp_graphs[layer] = []

    @property
    def rng_state(self) -> torch.Tensor | None:
        """The dropout stream after this pass (feed it to the next pass)."""
        return self._rng


def _lengths(tokens: int | Sequence[int]) -> tuple[int, ...]:
    return (tokens,) if isinstance(tokens, int) else tuple(tokens)


# The base weights a layer's LoRA deltas are fused over (forward.fused_projection).
FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def layer_graph_bytes(tokens: int | Sequence[int], config, lora_rank: int = 0, dropout: bool = False) -> int:
    """Bytes one layer's kept graph holds (fp32) for a micro-batch of the sequence lengths
    `tokens` (an int: one sequence), what autograd saves for backward, from the forward's ops:

    * per token: the two norms' outputs and scales, the residual, q and the GQA-expanded k/v
      with the attention output (twice) and log-sum-exp (the attention runs per sequence on the
      flash path: no [len, len] weights are saved), rope's cos/sin, gate/up with the SiLU
      and product outputs, the LoRA inputs' rank rows; with dropout, each targeted part's
      dropped input and its mask;
    * per layer: the fused LoRA A and block-diagonal B of each base weight at `lora_rank`
      (all seven projections: an upper bound for fewer).

    tests/finetune/test_layer_units.py checks it against the bytes autograd really saves.
    """
    num_tokens = sum(_lengths(tokens))
    h, q, i = config.hidden_size, config.q_size, config.intermediate_size
    # q, k, v, the attention output and its [T, q] copy for o_proj: 5 q (GQA: k/v expanded to q's size)
    per_token = 3 * h + 2 + 5 * q + config.num_heads + 2 * config.head_dim + 4 * i
    mask_bytes = 0
    for parts in FUSED_PROJECTIONS if lora_rank else ():
        per_token += lora_rank * len(parts)
        if dropout:  # the dropped input (fp32) and its mask (bool)
            in_features = config.features(parts[0])[0]
            per_token += in_features * len(parts)
            mask_bytes += in_features * len(parts)
    projections = [part for parts in FUSED_PROJECTIONS for part in parts]
    fused = fused_lora_bytes(config, dict.fromkeys(projections, lora_rank), projections) if lora_rank else 0
    return 4 * num_tokens * per_token + fused + num_tokens * mask_bytes


def fused_lora_bytes(config, ranks: dict[str, int], projections: Sequence[str]) -> int:
    """Bytes (fp32) of the fused LoRA A and block-diagonal B that `forward.fused_projection`
    builds for the base weights of `projections` (one of FUSED_PROJECTIONS each) at `ranks`."""
    total = 0
    for parts in FUSED_PROJECTIONS:
        if parts[0] in projections:
            rank = sum(ranks.get(part, 0) for part in parts)
            total += 4 * rank * (config.features(parts[0])[0] + sum(config.features(part)[1] for part in parts))
    return total


def pass_bytes(tokens: int | Sequence[int], config, graph_layers: int, lora_rank: int = 0,
               dropout: bool = False) -> int:
    """Bytes a pass holds between units (fp32): the block boundaries, plus the graphs of the
    `graph_layers` layers that keep theirs. Boundaries: each layer's input, and its attention
    block's output unless the layer keeps its graph (then that output is what the MLP
    block's graph saves), and the top's. A kept layer whose MLP ran in row chunks holds
    [T, hidden] more (LayerSlicedPass.chunk_output_bytes; the worker chunks it only within
    its budget)."""
    boundaries = 4 * sum(_lengths(tokens)) * (2 * config.num_layers - graph_layers + 1) * config.hidden_size
    return boundaries + graph_layers * layer_graph_bytes(tokens, config, lora_rank, dropout)


def activation_bytes(tokens: int | Sequence[int], config, keep_graph: bool, lora_rank: int = 0,
                     dropout: bool = False) -> int:
    """`pass_bytes` of a pass that keeps every layer's graph, or none."""
    return pass_bytes(tokens, config, config.num_layers if keep_graph else 0, lora_rank, dropout)


def graph_layers_within(tokens: int | Sequence[int], config, budget_bytes: int, lora_rank: int = 0,
                        dropout: bool = False) -> int:
    """How many layers' graphs a pass of `tokens` may keep within `budget_bytes` (its
    boundaries included)."""
    room = budget_bytes - pass_bytes(tokens, config, 0)
    # A kept layer adds its graph and no longer needs its attention output as a boundary.
    per_layer = layer_graph_bytes(tokens, config, lora_rank, dropout) - 4 * sum(_lengths(tokens)) * config.hidden_size
    return max(0, min(config.num_layers, room // per_layer))
