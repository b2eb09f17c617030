"""One micro-batch's forward + backward as a sequence of small work units (co-serving).

The engine gives training only the time inference leaves (research/flexllm.md §4.2), so
a training step must stop and resume at fine grain. A micro-batch of T packed tokens
becomes ``2L + C`` units for an L-layer decoder (C = loss chunks):

    FWD(0) .. FWD(L-1)   layer l from its input boundary h_l, no graph kept: stores h_{l+1}
    LOSS(0) .. LOSS(C-1) final norm + LM head + cross-entropy of the next loss tokens (the
                         caller says how many; LOSS_CHUNK by default: the LM head is the
                         largest GEMM), backward to their rows of dL/dh_L
    BWD(L-1) .. BWD(0)   recompute layer l from h_l with autograd, backpropagate dL/dh_{l+1}
                         to dL/dh_l; LoRA A/B of layer l accumulate their gradients

This is activation checkpointing at layer granularity: only the L+1 boundaries
([T, hidden] each) live between units, never a layer's graph. Every unit sees the whole
micro-batch, so training needs no KV cache and its GEMMs keep T rows.

With ``keep_graph=True`` (when the micro-batch's activations fit the memory the engine
grants training) FWD(l) keeps layer l's autograd graph instead, cut off from the layers
around it, and BWD(l) only backpropagates through it: no recompute, about a quarter less
work per step, and the units stay just as preemptible. When the memory granted holds only
some layers' graphs, ``graph_layers=k`` keeps those of the top k layers and recomputes
the others: each kept layer saves its recompute, so a budget short of the whole pass
still buys its share of the speed (rather than none). The top layers are the ones kept
because their graphs are freed first in backward.

The gradients equal those of `packed_loss(...).backward()` (the same ops in the same
order, only split at layer boundaries). LoRA dropout: each FWD(l) runs on the unit's own
random stream, saved so that BWD(l) replays the very same mask; the engine's global
random state (inference sampling) is never advanced by training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .base_weights import BaseWeights
from .data import IGNORE_INDEX
from .forward import PackedLayout, decoder_layer, rms_norm
from .lora_params import LoraParams
from .packing import PackedBatch

FWD, LOSS, BWD = "fwd", "loss", "bwd"
LOSS_CHUNK = 32  # loss tokens per LOSS unit by default: the LM head's GEMM is split to keep units short


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
    ) -> None:
        self.base, self.lora, self.batch = base, lora, batch
        self.num_layers = len(base.layers)
        device = base.embed_tokens.device
        self.input_ids = batch.input_ids.to(device)
        self.targets = batch.targets.to(device)
        self.keep = self.targets != IGNORE_INDEX
        self.num_loss_tokens = int(self.keep.sum())
        if self.num_loss_tokens == 0:
            raise ValueError("the micro-batch has no loss tokens")
        self._loss_index = self.keep.nonzero().squeeze(1)  # rows with a loss, in order
        self._loss_done = 0  # of them, how many LOSS units have covered
        self._loss_sum: torch.Tensor | None = None
        self.dropout = lora.settings.dropout
        self._rng = rng_state
        self._layer_rng: list[torch.Tensor | None] = [None] * self.num_layers
        self._layout: PackedLayout | None = None
        self._boundaries: list[torch.Tensor | None] = []  # h_0 .. h_L, detached
        if graph_layers is None:
            graph_layers = self.num_layers if keep_graph else 0
        if not 0 <= graph_layers <= self.num_layers:
            raise ValueError(f"graph_layers must be in [0, {self.num_layers}], got {graph_layers}")
        self.graph_layers = graph_layers
        self.planned_graph_layers = graph_layers  # at the start (graph_layers shrinks if graphs are dropped)
        self._outputs: list[torch.Tensor | None] = [None] * self.num_layers  # kept layers' outputs with their graphs
        self._grad: torch.Tensor | None = None  # dL/dh of the boundary above the next BWD
        self._next = (FWD, 0)
        self.loss: float | None = None

    @property
    def num_units(self) -> int:
        """Units of the pass with LOSS_CHUNK-row LOSS units."""
        return 2 * self.num_layers + -(-self.num_loss_tokens // LOSS_CHUNK)

    @property
    def loss_rows_left(self) -> int:
        return self.num_loss_tokens - self._loss_done

    @property
    def next_kind(self) -> str | None:
        """Kind of the next unit (FWD / LOSS / BWD), None when the pass is complete."""
        return None if self._next is None else self._next[0]

    @property
    def done(self) -> bool:
        return self._next is None

    @property
    def keep_graph(self) -> bool:
        """Whether any layer keeps its graph from FWD to BWD."""
        return self.graph_layers > 0

    def _keeps(self, index: int) -> bool:
        return index >= self.num_layers - self.graph_layers

    def run_unit(self, loss_rows: int | None = None) -> str:
        """Run the next unit; returns its kind. A LOSS unit covers the next `loss_rows` loss
        tokens (default LOSS_CHUNK): fewer rows make a shorter unit, more rows a faster
        GEMM per row (on 2 CPU cores the LM head runs ~1.7x faster per row at 256 rows than
        at 32), so an idle engine asks for them all at once."""
        if self._next is None:
            raise RuntimeError("the pass is complete")
        kind, layer = self._next
        with torch.inference_mode(False), torch.enable_grad():
            if kind == FWD:
                self._forward(layer)
                self._next = (FWD, layer + 1) if layer + 1 < self.num_layers else (LOSS, 0)
            elif kind == LOSS:
                self._loss(max(1, LOSS_CHUNK if loss_rows is None else loss_rows))
                last = self._loss_done == self.num_loss_tokens
                self._next = (BWD, self.num_layers - 1) if last else (LOSS, layer + 1)
            else:
                self._backward(layer)
                self._next = (BWD, layer - 1) if layer > 0 else None
        return kind

    # -- units -----------------------------------------------------------------------------
    def _layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return decoder_layer(
            hidden, self.base.layers[index], self.lora.layer(index), self._layout, self.base.config,
            self.dropout, training=True,
        )

    def _forward(self, index: int) -> None:
        if index == 0:
            self._layout = PackedLayout.build(self.batch.seq_lens, self.base.config, self.base.dtype,
                                              self.input_ids.device)
            self._boundaries = [F.embedding(self.input_ids, self.base.embed_tokens).detach()]
        hidden = self._boundaries[index]
        keep = self._keeps(index)
        if keep and index > 0:
            hidden.requires_grad_(True)  # the cut between this layer's graph and the one below
        with torch.set_grad_enabled(keep):
            if self.dropout:
                self._layer_rng[index] = self._rng if self._rng is not None else torch.get_rng_state()
                with torch.random.fork_rng(devices=[]):
                    torch.set_rng_state(self._layer_rng[index])
                    out = self._layer(index, hidden)
                    self._rng = torch.get_rng_state()
            else:
                out = self._layer(index, hidden)
        if keep:
            self._outputs[index] = out
            out = out.detach()
        self._boundaries.append(out)

    def _loss(self, num_rows: int) -> None:
        top = self._boundaries[self.num_layers].requires_grad_(True)
        rows = self._loss_index[self._loss_done:self._loss_done + num_rows]
        self._loss_done += rows.numel()
        # rms_norm is per row: normalising only this chunk's rows is the same computation.
        hidden = rms_norm(top[rows], self.base.norm, self.base.config.rms_norm_eps)
        logits = F.linear(hidden, self.base.lm_head).to(torch.float32)  # [chunk tokens, vocab]
        loss = F.cross_entropy(logits, self.targets[rows], reduction="sum") / self.num_loss_tokens
        loss.backward()  # accumulates into top.grad, row by row
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        if self._loss_done == self.num_loss_tokens:
            self.loss = float(self._loss_sum)
            self._grad = top.grad
            self._boundaries[self.num_layers] = None

    def _backward(self, index: int) -> None:
        hidden = self._boundaries[index]
        if self._outputs[index] is not None:
            out, self._outputs[index] = self._outputs[index], None
            out.backward(self._grad)
            self._grad = hidden.grad if index > 0 else None
            self._boundaries[index] = None
            return
        if index > 0:  # the embedding is frozen: no gradient below layer 0
            hidden.requires_grad_(True)
        if self.dropout:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self._layer_rng[index])
                out = self._layer(index, hidden)
        else:
            out = self._layer(index, hidden)
        out.backward(self._grad)
        self._grad = hidden.grad if index > 0 else None
        self._boundaries[index] = None

    def drop_graphs(self, keep_layers: int = 0) -> None:
        """Keep at most the top `keep_layers` layers' graphs, from any unit boundary on (the
        memory of the others is wanted back): the graphs of the layers below are freed, the
        rest of the pass runs as if it had never kept them (their BWD units recompute the
        layer from its boundary, replaying the same dropout masks), and the gradients stay
        the same."""
        self.graph_layers = max(0, min(self.graph_layers, keep_layers))
        for index in range(self.num_layers - self.graph_layers):
            self._outputs[index] = None

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
    per_layer = 0
    for parts in FUSED_PROJECTIONS if lora_rank else ():
        rank = lora_rank * len(parts)
        in_features = config.features(parts[0])[0]
        out_features = sum(config.features(part)[1] for part in parts)
        per_token += rank
        per_layer += rank * (in_features + out_features)
        if dropout:
            per_token += 2 * in_features * len(parts)
    return 4 * (num_tokens * per_token + per_layer)


def pass_bytes(tokens: int | Sequence[int], config, graph_layers: int, lora_rank: int = 0,
               dropout: bool = False) -> int:
    """Bytes a pass holds between units (fp32): the layer boundaries, plus the graphs of the
    `graph_layers` layers that keep theirs."""
    boundaries = 4 * sum(_lengths(tokens)) * config.num_layers * config.hidden_size
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
    return max(0, min(config.num_layers, room // layer_graph_bytes(tokens, config, lora_rank, dropout)))
