"""The shape of the base model an adapter must fit, whole and per tensor-parallel rank.

Pure shape math, no weights. The TP rules follow S-LoRA / vLLM's fully sharded LoRA:

* column-parallel slices (q, k, v, gate, up): A is split along the rank dimension, so a
  rank keeps ``ceil(r / tp)`` rows of full input length (the rank is padded up to a
  multiple of ``tp`` per adapter, padded rows are zero); after the shrink the
  ``tokens x r`` result is all-gathered, so B^T keeps all ``r_padded`` rows but only the
  rank's ``out / tp`` columns.
* row-parallel slices (o, down): A is split along its input (``r`` rows of ``in / tp``),
  the shrink is all-reduced, and B^T keeps ``r`` rows of the rank's ``out / tp`` outputs
  (added into the rank's output slice before the base layer's all-reduce).

So every matrix shrinks by ``1 / tp`` and, with pages that also shrink by ``1 / tp``,
blocks per adapter do not depend on ``tp``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._layout import MatrixSpec
from .modules import COLUMN_PARALLEL

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _parse_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value is None:
        return torch.float32
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported model dtype {value!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_hf_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A HF config as a dict, from a dict, a config.json path or a model directory."""
    if isinstance(config, Mapping):
        return dict(config)
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        return json.load(f)


@dataclass(frozen=True)
class BaseModelShape:
    """Sizes of a Llama-family decoder that LoRA weights must match."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_hf_config(
        cls, config: Mapping[str, Any] | str | os.PathLike, dtype: torch.dtype | str | None = None
    ) -> BaseModelShape:
        """Build from a HF `config.json` (dict, file path or model directory).

        ``dtype`` overrides the config's ``torch_dtype``/``dtype`` (the pool's dtype is
        what adapter weights are converted to).
        """
        cfg = load_hf_config(config)
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // heads
        return cls(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(cfg["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            vocab=int(cfg["vocab_size"]),
            dtype=_parse_dtype(dtype if dtype is not None else cfg.get("torch_dtype", cfg.get("dtype"))),
        )

    def features(self, projection: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection's full, unsharded weight."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q_out),
            "k_proj": (self.hidden, kv_out),
            "v_proj": (self.hidden, kv_out),
            "o_proj": (q_out, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[projection]

    def for_tp(self, tp_size: int, tp_rank: int) -> ShardShape:
        """Per-rank LoRA matrix sizes and weight ranges for tensor parallelism."""
        return ShardShape(self, tp_size, tp_rank)

    def slice_matrices(self, projection: str, rank: int) -> tuple[MatrixSpec, MatrixSpec]:
        """(A, B^T) row stacks of one slice without tensor parallelism."""
        return self.for_tp(1, 0).slice_matrices(projection, rank)


@dataclass(frozen=True)
class ShardShape:
    """What one tensor-parallel rank holds of every LoRA slice (see module docstring)."""

    base: BaseModelShape
    tp_size: int
    tp_rank: int

    def __post_init__(self) -> None:
        b, tp = self.base, self.tp_size
        if tp < 1 or not 0 <= self.tp_rank < tp:
            raise ValueError(f"bad tensor-parallel position rank={self.tp_rank} size={tp}")
        problems = []
        for what, value in (("hidden_size", b.hidden), ("intermediate_size", b.intermediate),
                            ("num_attention_heads", b.num_heads)):
            if value % tp:
                problems.append(f"{what}={value}")
        # vLLM splits KV heads when there are at least tp of them, else replicates them.
        if (b.num_kv_heads % tp) if b.num_kv_heads >= tp else (tp % b.num_kv_heads):
            problems.append(f"num_key_value_heads={b.num_kv_heads}")
        if problems:
            raise ValueError(f"tensor parallel size {tp} does not divide {', '.join(problems)}")

    def padded_rank(self, projection: str, rank: int) -> int:
        """The rank after padding to a multiple of tp (column-parallel slices only)."""
        if projection in COLUMN_PARALLEL:
            return math.ceil(rank / self.tp_size) * self.tp_size
        return rank

    def out_range(self, projection: str) -> tuple[int, int]:
        """[start, stop) of the full output dimension this rank produces."""
        b, tp, r = self.base, self.tp_size, self.tp_rank
        if projection in ("k_proj", "v_proj") and b.num_kv_heads < tp:
            # Replicated KV heads: several ranks serve the same head.
            head = r * b.num_kv_heads // tp
            return head * b.head_dim, (head + 1) * b.head_dim
        out = b.features(projection)[1]
        return r * out // tp, (r + 1) * out // tp

    def in_range(self, projection: str) -> tuple[int, int]:
        """[start, stop) of the full input dimension this rank reads (A's columns)."""
        full_in = self.base.features(projection)[0]
        if projection in COLUMN_PARALLEL:
            return 0, full_in
        return self.tp_rank * full_in // self.tp_size, (self.tp_rank + 1) * full_in // self.tp_size

    def a_row_range(self, projection: str, rank: int) -> tuple[int, int]:
        """[start, stop) of the (padded) rank rows of A this rank holds."""
        if projection in COLUMN_PARALLEL:
            per_rank = self.padded_rank(projection, rank) // self.tp_size
            return self.tp_rank * per_rank, (self.tp_rank + 1) * per_rank
        return 0, rank

    def slice_matrices(self, projection: str, rank: int) -> tuple[MatrixSpec, MatrixSpec]:
        """(A, B^T) row stacks this rank stores for a slice of LoRA rank ``rank``."""
        a_start, a_stop = self.a_row_range(projection, rank)
        in_start, in_stop = self.in_range(projection)
        out_start, out_stop = self.out_range(projection)
        return (
            MatrixSpec(rows=a_stop - a_start, row_len=in_stop - in_start),
            MatrixSpec(rows=self.padded_rank(projection, rank), row_len=out_stop - out_start),
        )
