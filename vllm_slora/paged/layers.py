"""Paged LoRA around vLLM's linear layers: output = base(x) + LoRA delta, per token.

One wrapper class serves qkv_proj (3 slices), o_proj, gate_up_proj (2 slices) and
down_proj: the slices a module carries and their output widths are all that differ.
Tokens with no adapter (row -1) get exactly the base layer's output, bit for bit: the
delta is only ever added to rows of tokens with an adapter (stock vLLM's CPU path adds
the last slot's adapter to them, research/vllm_internals.md §2.9).

Tensor parallelism follows S-LoRA (research/vllm_internals.md §4.3):

* column-parallel (qkv, gate_up): shrink with this rank's rows of A, all-gather the
  ``tokens x r/tp`` results, expand with this rank's output columns of B, once per
  gathered chunk (vllm_slora/paged/adapter_tables.py);
* row-parallel (o, down): shrink with this rank's input columns of A, all-reduce it,
  expand with this rank's output rows of B into this rank's slice of the base layer's
  partial sum *before* its all-reduce, which then sums base and LoRA in one collective.

Every rank runs the same collectives: the step's adapter tables come from the same
scheduler plan on every rank.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from vllm_slora.adapters import BaseModelShape

from .modules import PAGED_MODULES
from .step_metadata import StepMetadata
from .tensor_parallel import SINGLE, TPGroup

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def decoder_layer_index(module_name: str) -> int | None:
    """3 for "model.layers.3.self_attn.qkv_proj"; None outside the decoder layers."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


class LayerLoRA:
    """Everything one wrapped projection needs to add its LoRA delta, found by key.

    The custom op below receives only ``(x, y, key)``: the key is a Python int that
    torch.compile bakes into the graph as a constant, and everything per step (the
    token->slot map, the tables, the pool) is read through the shared `StepMetadata`
    when the op runs. So a graph traced before the KV cache exists, or in a step
    without adapters, is right for every later step.
    """

    def __init__(self, md: StepMetadata, backend, module_name: str, layer_index: int,
                 out_sizes: Sequence[int], tp: TPGroup, row_parallel: bool) -> None:
        self.md = md
        self.backend = backend
        self.module_name = module_name
        self.layer_index = layer_index
        self.out_sizes = list(out_sizes)
        self.tp = tp
        self.row_parallel = row_parallel

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[t] += scaling * B A x[t] for every token t with an adapter (in place)."""
        md, backend = self.md, self.backend
        x2 = x.reshape(-1, x.shape[-1])  # [T, in]
        y2 = y.view(-1, y.shape[-1])  # [T, sum(out_sizes)], y's storage (a view, never a copy)
        num_tokens = x2.shape[0]
        # The no-LoRA decision, inside the op: on CPU a host flag; on CUDA nothing is
        # skipped (the kernels exit early per token) so what a graph captures is what
        # every step needs.
        if num_tokens == 0 or (not backend.cuda_safe and not md.any_adapter):
            return
        tables = md.tables[self.module_name]
        layer = self.layer_index
        pool = md.pool(layer, x2.dtype)
        tokens = md.token_adapter[:num_tokens]
        a_offsets, a_ranks, scalings = tables.a_offsets[layer], tables.a_ranks[layer], tables.scalings[layer]
        key = (self.module_name, layer)
        buf = torch.empty(a_offsets.shape[1], num_tokens, md.max_rows, dtype=torch.float32, device=x2.device)
        backend.shrink(md, key + ("a",), x2, pool, a_offsets, a_ranks, tokens, buf)  # [n_slices, T, R]
        if self.row_parallel and self.tp.size > 1:
            # Partial sums over this rank's input columns -> the full x @ A^T everywhere.
            buf = self.tp.all_reduce(buf)
        if self.row_parallel or self.tp.size == 1:
            backend.expand(md, key + ("b",), buf, pool, tables.b_offsets[layer], tables.b_ranks[layer], scalings,
                           tokens, y2, self.out_sizes)
            return
        # Column-parallel: chunk k of the gathered vector is rank k's rows of x @ A^T.
        gathered = self.tp.all_gather_last(buf)  # [n_slices, T, tp * R]
        width = buf.shape[2]
        for k in range(self.tp.size):
            backend.expand(md, key + (f"b{k}",), gathered[..., k * width : (k + 1) * width], pool,
                           tables.b_chunk_offsets[k, layer], a_ranks, scalings, tokens, y2, self.out_sizes)


_LAYERS: list[LayerLoRA] = []  # key -> layer; lives as long as the process (one model per worker)


@torch.library.custom_op("slora::paged_lora_delta", mutates_args=("y",))
def paged_lora_delta(x: torch.Tensor, y: torch.Tensor, key: int) -> None:
    """y += the LoRA delta of layer ``key`` for this step's tokens (opaque to compile)."""
    _LAYERS[key].apply(x, y)


_TRACED: set[int] = set()


@paged_lora_delta.register_fake
def _(x: torch.Tensor, y: torch.Tensor, key: int) -> None:
    # Runs while torch.compile traces, never per step: note what the trace saw, so
    # tests can prove a graph traced without adapters serves steps with adapters.
    if key not in _TRACED:
        _TRACED.add(key)
        md = _LAYERS[key].md
        if len(_TRACED) == 1:
            from vllm_slora import trace

            trace.record("lora_op_traced", step=md.step, any_adapter=md.any_adapter)
    return None


class PagedLoRALinear(nn.Module):
    # The delta needs the plain activation, so vLLM must not hand this layer a
    # pre-quantized one (fused act+quant checks this flag on the consumer).
    requires_unquantized_input = True

    def __init__(
        self,
        base_layer: nn.Module,
        module_name: str,
        layer_index: int,
        out_sizes: tuple[int, ...],
        md: StepMetadata,
        backend,
        tp: TPGroup = SINGLE,
        row_parallel: bool = False,
        out_start: int = 0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name  # key of PAGED_MODULES, e.g. "qkv_proj"
        self.layer_index = layer_index
        self.out_sizes = tuple(out_sizes)  # this TP rank's output width of every slice
        self.tp = tp
        self.row_parallel = row_parallel
        # Row-parallel at tp > 1: where this rank's LoRA output slice starts in the base
        # layer's (full-width, partial-sum) output.
        self.out_start = out_start
        self.lora = LayerLoRA(md, backend, module_name, layer_index, out_sizes, tp, row_parallel)
        self.lora_key = len(_LAYERS)
        _LAYERS.append(self.lora)

    def __getattr__(self, name: str):
        # Model code may read attributes of the layer it built (sizes, quant_method...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_layer, name)

    def forward(self, x: torch.Tensor):
        # Static per layer (set at start-up), not per step: safe to branch on.
        if self.row_parallel and self.tp.size > 1:
            return self._row_parallel_forward(x)
        result = self.base_layer(x)  # vLLM contract: (output, bias) or output
        self.add_lora(x, result[0] if isinstance(result, tuple) else result)
        return result

    def _row_parallel_forward(self, x: torch.Tensor):
        """vLLM's RowParallelLinear.forward with the LoRA delta added before the all-reduce."""
        base = self.base_layer
        if not base.input_is_parallel:
            raise NotImplementedError(f"vllm-slora: {self.module_name} with input_is_parallel=False")
        # Bias only on rank 0 so the all-reduce adds it once (as vLLM does).
        bias = None if (base.tp_rank > 0 or base.skip_bias_add) else base.bias
        partial = base.quant_method.apply(base, x, bias)
        width = sum(self.out_sizes)
        self.add_lora(x, partial[..., self.out_start : self.out_start + width])
        output = self.tp.all_reduce(partial) if base.reduce_results else partial
        if not base.return_bias:
            return output
        return output, (base.bias if base.skip_bias_add else None)

    def add_lora(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[t] += scaling * B A x[t] for every token t with an adapter (in place)."""
        if torch.compiler.is_compiling():
            torch.ops.slora.paged_lora_delta(x, out, self.lora_key)
        else:  # eager: skip the dispatcher round trip (decided at trace time, not per step)
            self.lora.apply(x, out)

    def extra_repr(self) -> str:
        return f"module={self.module_name}, layer={self.layer_index}, out_sizes={self.out_sizes}"


def slice_out_sizes(base: BaseModelShape, module_name: str, tp_size: int, tp_rank: int) -> tuple[int, ...]:
    """Output width, on this TP rank, of every slice of a paged module."""
    shard = base.for_tp(tp_size, tp_rank)
    return tuple(stop - start for start, stop in (shard.out_range(p) for p in PAGED_MODULES[module_name]))


def install_paged_layers(
    model: nn.Module, md: StepMetadata, backend, base: BaseModelShape, linear_types: tuple[type, type],
    tp: TPGroup = SINGLE,
) -> list[PagedLoRALinear]:
    """Replace every LoRA-able linear of ``model`` by a `PagedLoRALinear` around it.

    ``linear_types`` are vLLM's (column-parallel, row-parallel) linear classes (from
    compat), so this file needs no vLLM import. Embeddings and lm_head are left alone.
    """
    column_type, row_type = linear_types
    installed = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in PAGED_MODULES or not isinstance(module, (column_type, row_type)):
            continue
        layer = decoder_layer_index(name)
        if layer is None:
            raise NotImplementedError(f"vllm-slora: cannot tell the decoder layer of {name}")
        row_parallel = isinstance(module, row_type)
        out_sizes = slice_out_sizes(base, leaf, tp.size, tp.rank)
        # A row-parallel layer's output is full width (a partial sum before its
        # all-reduce); this rank's LoRA slice is 1/tp of it.
        expected = sum(out_sizes) * (tp.size if row_parallel else 1)
        if expected != module.output_size_per_partition:
            raise NotImplementedError(
                f"vllm-slora: {name} produces {module.output_size_per_partition} outputs, the "
                f"adapter slices {leaf} expect {expected}"
            )
        out_start = base.for_tp(tp.size, tp.rank).out_range(PAGED_MODULES[leaf][0])[0] if row_parallel else 0
        wrapper = PagedLoRALinear(module, leaf, layer, out_sizes, md, backend, tp, row_parallel, out_start)
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, leaf, wrapper)
        installed.append(wrapper)
    return installed
