"""Reading an adapter's weights into dense per-layer, per-slice tensors.

Scaling is kept separate (the kernels take one scaling per adapter and slice), unlike
stock vLLM, which folds it into B. `AdapterWeights.page_matrices` yields a layer's
tensors exactly in the order and shapes of `AdapterSpec.layer_matrices`, whole or as
one tensor-parallel rank's shard, ready to be copied row by row into pages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .checkpoint import read_tensors
from .errors import AdapterError
from .modules import COLUMN_PARALLEL
from .spec import AdapterSpec


@dataclass(frozen=True)
class SliceWeights:
    """One slice's LoRA pair; rank-0 slices hold empty tensors of the right widths."""

    projection: str
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scaling: float  # not folded into b


@dataclass(frozen=True)
class AdapterWeights:
    """All layers' slices of one adapter, in `SLICE_ORDER`."""

    spec: AdapterSpec
    layers: tuple[tuple[SliceWeights, ...], ...]

    def page_matrices(self, layer: int, tp_size: int = 1, tp_rank: int = 0) -> list[torch.Tensor]:
        """[A_s, B_s^T for s in SLICE_ORDER] of one layer, for one TP rank.

        Shapes equal ``spec.layer_matrices(layer, tp_size, tp_rank)`` one to one; rank
        padding rows (column-parallel, rank not divisible by tp) are zero.
        """
        shard = self.spec.base.for_tp(tp_size, tp_rank)
        out: list[torch.Tensor] = []
        for w in self.layers[layer]:
            rank = w.a.shape[0]
            a, bt = w.a, w.b.t()
            padded = shard.padded_rank(w.projection, rank)
            if padded != rank:
                a = torch.cat([a, a.new_zeros(padded - rank, a.shape[1])])
                bt = torch.cat([bt, bt.new_zeros(padded - rank, bt.shape[1])])
            row_start, row_stop = shard.a_row_range(w.projection, rank)
            in_start, in_stop = shard.in_range(w.projection)
            out_start, out_stop = shard.out_range(w.projection)
            if w.projection in COLUMN_PARALLEL:
                a = a[row_start:row_stop]
            out.append(a[:, in_start:in_stop])
            out.append(bt[:, out_start:out_stop])
        return out


def _finite(name: str, key: str, stored: torch.Tensor, converted: torch.Tensor) -> torch.Tensor:
    """``converted`` if every value is finite, else AdapterError naming the tensor.

    One NaN or Inf in a LoRA weight turns every output it touches into NaN, and through
    shared batches and KV pages could reach other requests; such an adapter is refused.
    """
    if not bool(torch.isfinite(converted).all()):
        if bool(torch.isfinite(stored).all()):
            problem = f"overflows {converted.dtype} (values up to {stored.abs().max().item():.3g})"
        else:
            problem = "holds NaN or Inf values"
        raise AdapterError(name, f"tensor {key} {problem}")
    return converted


def check_adapter_weights(spec: AdapterSpec, dtype: torch.dtype | None = None) -> None:
    """Read every LoRA tensor once and refuse non-finite values (see `_finite`).

    Tensors are read one at a time (safetensors is memory-mapped), so checking a large
    adapter never holds more than one layer's tensors. Raises AdapterError.
    """
    dtype = dtype or spec.base.dtype
    per_layer = [[k for s in layer if s.rank for k in (s.a_key, s.b_key)] for layer in spec.layers]
    if spec.checkpoint.format != "safetensors":  # a pickle is read whole anyway
        per_layer = [[k for keys in per_layer for k in keys]]
    for keys in per_layer:
        tensors = read_tensors(spec.name, spec.checkpoint, keys)
        for key in keys:
            _finite(spec.name, key, tensors[key], tensors[key].to(dtype))
        del tensors


def load_adapter_weights(
    spec: AdapterSpec, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> AdapterWeights:
    """Read every lora_A / lora_B of a validated adapter (dtype defaults to the base's).

    ``tensors`` (PEFT keys) replaces reading the checkpoint when the weights are in memory.
    Raises AdapterError for a tensor with NaN / Inf values, in the file or once
    converted to ``dtype`` (packing for the pool goes through here).
    """
    dtype = dtype or spec.base.dtype
    keys = [k for layer in spec.layers for s in layer if s.rank for k in (s.a_key, s.b_key)]
    if tensors is None:
        tensors = read_tensors(spec.name, spec.checkpoint, keys)
    else:  # already in memory (a just-trained adapter): the same checks, no disk read
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise AdapterError(spec.name, f"the in-memory weights lack {missing[:3]}")
    layers = []
    for layer in spec.layers:
        slices = []
        for s in layer:
            in_features, out_features = spec.base.features(s.projection)
            if s.rank:
                a, b = tensors[s.a_key], tensors[s.b_key]
                # The file may have been replaced since registration.
                if tuple(a.shape) != (s.rank, in_features) or tuple(b.shape) != (out_features, s.rank):
                    raise AdapterError(spec.name, f"weights of {s.a_key} changed shape since registration")
                a = _finite(spec.name, s.a_key, tensors[s.a_key], a.to(device=device, dtype=dtype).contiguous())
                b = _finite(spec.name, s.b_key, tensors[s.b_key], b.to(device=device, dtype=dtype).contiguous())
            else:
                a = torch.zeros(0, in_features, dtype=dtype, device=device)
                b = torch.zeros(out_features, 0, dtype=dtype, device=device)
            slices.append(SliceWeights(s.projection, a, b, s.scaling))
        layers.append(tuple(slices))
    return AdapterWeights(spec, tuple(layers))
