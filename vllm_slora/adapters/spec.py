"""`AdapterSpec`: everything about a validated adapter except its weights.

An adapter is described per decoder layer by seven `SliceSpec`s in `SLICE_ORDER`
(q, k, v, o, gate, up, down); a slice the adapter does not target in that layer has
rank 0. The rows of one layer go into pages as ``A_s`` then ``B_s^T`` for each slice
in that order (`layer_matrices`), 14 matrices per layer, rank-0 ones empty. Ranks may
differ between layers (`rank_pattern` can name single layers), so the layout is
planned per layer and an adapter needs the largest per-layer page count in blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._layout import AdapterPageLayout, MatrixSpec, dense_pages, plan_layout
from .base_model import BaseModelShape
from .checkpoint import CheckpointIndex
from .peft_config import LoraHyperparams


@dataclass(frozen=True)
class SliceSpec:
    """One LoRA slice of one layer: rank, scaling and where its tensors are stored."""

    projection: str
    rank: int  # 0: no LoRA on this projection in this layer
    scaling: float  # alpha / r (or alpha / sqrt(r)); NOT folded into the weights
    a_key: str | None = None  # tensor name of lora_A [rank, in] in the checkpoint
    b_key: str | None = None  # tensor name of lora_B [out, rank]


@dataclass(frozen=True)
class AdapterSpec:
    """A registered adapter: validated metadata, no tensor data."""

    name: str
    path: str
    base: BaseModelShape
    hyperparams: LoraHyperparams
    checkpoint: CheckpointIndex
    layers: tuple[tuple[SliceSpec, ...], ...]  # [layer][slice index in SLICE_ORDER]
    version: int = 1  # bumped when a name is registered again, for cache/prefix keys
    # (inode, size, mtime_ns) of each adapter file when it was validated (None: absent).
    # Carried with every load so a worker reads exactly the files the scheduler sized.
    files: tuple = ()

    @property
    def max_rank(self) -> int:
        return max(s.rank for layer in self.layers for s in layer)

    @property
    def is_uniform_across_layers(self) -> bool:
        """True when every layer has the same slice ranks (one layout serves all)."""
        return len({self._layer_ranks(i) for i in range(len(self.layers))}) == 1

    def _layer_ranks(self, layer: int) -> tuple[int, ...]:
        return tuple(s.rank for s in self.layers[layer])

    def ranks(self) -> torch.Tensor:
        """int32 [num_layers, 7]: rank of every slice, 0 where untargeted."""
        return torch.tensor([[s.rank for s in layer] for layer in self.layers], dtype=torch.int32)

    def scalings(self) -> torch.Tensor:
        """float32 [num_layers, 7]: scaling of every slice, 0.0 where untargeted."""
        return torch.tensor(
            [[s.scaling if s.rank else 0.0 for s in layer] for layer in self.layers], dtype=torch.float32
        )

    def layer_matrices(self, layer: int, tp_size: int = 1, tp_rank: int = 0) -> list[MatrixSpec]:
        """Row stacks of one layer in page order: A_s, B_s^T for s in SLICE_ORDER.

        With ``tp_size > 1`` these are what TP rank ``tp_rank`` stores (see base_model).
        """
        shard = self.base.for_tp(tp_size, tp_rank)
        matrices: list[MatrixSpec] = []
        for s in self.layers[layer]:
            matrices.extend(shard.slice_matrices(s.projection, s.rank))
        return matrices

    def layer_layout(self, layer: int, page_elems: int, tp_size: int = 1, tp_rank: int = 0) -> AdapterPageLayout:
        """Placement of one layer's rows in pages of ``page_elems`` elements."""
        return plan_layout(self.layer_matrices(layer, tp_size, tp_rank), page_elems)

    def blocks_needed(self, page_elems: int, tp_size: int = 1) -> int:
        """Pool blocks this adapter occupies: the largest per-layer page count.

        ``page_elems`` is the page size in adapter-dtype elements *on one TP rank*.
        """
        distinct = {self._layer_ranks(i): i for i in range(len(self.layers))}
        return max(self.layer_layout(i, page_elems, tp_size).num_pages for i in distinct.values())

    def dense_blocks(self, page_elems: int, tp_size: int = 1) -> int:
        """Lower bound on blocks if rows could straddle pages (for comparison)."""
        distinct = {self._layer_ranks(i): i for i in range(len(self.layers))}
        return max(dense_pages(self.layer_matrices(i, tp_size), page_elems) for i in distinct.values())

    def num_elements(self, tp_size: int = 1, tp_rank: int = 0) -> int:
        """Adapter weight elements across all layers (on one TP rank)."""
        return sum(
            m.rows * m.row_len for i in range(len(self.layers)) for m in self.layer_matrices(i, tp_size, tp_rank)
        )

