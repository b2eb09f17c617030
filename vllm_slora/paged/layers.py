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

import torch
from torch import nn

from vllm_slora.adapters import BaseModelShape

from .modules import PAGED_MODULES
from .ops import expand_torch, paged_lora_expand, paged_lora_shrink, prepare_runs, row_runs, shrink_torch
from .step_state import StepState
from .tensor_parallel import SINGLE, TPGroup

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def decoder_layer_index(module_name: str) -> int | None:
    """3 for "model.layers.3.self_attn.qkv_proj"; None outside the decoder layers."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


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
        state: StepState,
        tp: TPGroup = SINGLE,
        row_parallel: bool = False,
        out_start: int = 0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name  # key of PAGED_MODULES, e.g. "qkv_proj"
        self.layer_index = layer_index
        self.out_sizes = tuple(out_sizes)  # this TP rank's output width of every slice
        self.state = state
        self.tp = tp
        self.row_parallel = row_parallel
        # Row-parallel at tp > 1: where this rank's LoRA output slice starts in the base
        # layer's (full-width, partial-sum) output.
        self.out_start = out_start

    def __getattr__(self, name: str):
        # Model code may read attributes of the layer it built (sizes, quant_method...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_layer, name)

    def forward(self, x: torch.Tensor):
        if self.row_parallel and self.tp.size > 1 and self.state.has_lora:
            return self._row_parallel_forward(x)
        result = self.base_layer(x)  # vLLM contract: (output, bias) or output
        if self.state.has_lora:
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
        state = self.state
        rows = state.tables.modules[self.module_name]
        layer = self.layer_index
        pool = state.pools[layer]
        x2 = x.reshape(-1, x.shape[-1])  # [T, in]
        out2 = out.reshape(-1, out.shape[-1])  # [T, sum(out_sizes)], shares out's storage
        assert out2.data_ptr() == out.data_ptr(), "the LoRA delta must land in the layer's output"
        num_tokens = x2.shape[0]
        meta = state.prepared_meta(num_tokens)  # no-op unless the batch was padded
        tokens = state.tokens(num_tokens)
        a_offsets, a_ranks, scalings = rows.a_offsets[layer], rows.a_ranks[layer], rows.scalings[layer]
        buf = torch.empty(a_offsets.shape[1], num_tokens, a_offsets.shape[2], dtype=torch.float32, device=x.device)
        self._shrink(x2, pool, a_offsets, a_ranks, tokens, buf, meta)  # [n_slices, T, R]
        if self.row_parallel and self.tp.size > 1:
            # Partial sums over this rank's input columns -> the full x @ A^T everywhere.
            buf = self.tp.all_reduce(buf)
        if self.row_parallel or self.tp.size == 1:
            self._expand(buf, pool, rows.b_offsets[layer], rows.b_ranks[layer], scalings, tokens, out2, meta, "b")
        else:
            # Column-parallel: chunk k of the gathered vector is rank k's rows of x @ A^T.
            gathered = self.tp.all_gather_last(buf)  # [n_slices, T, tp * R]
            width = buf.shape[2]
            for k in range(self.tp.size):
                self._expand(gathered[..., k * width : (k + 1) * width], pool, rows.b_chunk_offsets[k][layer],
                             a_ranks, scalings, tokens, out2, meta, f"b{k}")

    # On CUDA the registered ops (Triton); on CPU the torch path called directly with the
    # step's token grouping and the tables' row runs computed once, not per call. vLLM runs
    # LoRA models eagerly on CPU (its platform sets CompilationMode.NONE), so the custom
    # op boundary buys nothing there.
    def _shrink(self, x, pool, offsets, ranks, tokens, buf, meta) -> None:
        if x.is_cuda and self.state.use_triton:
            paged_lora_shrink(x, pool, offsets, ranks, tokens, buf, meta)
            return
        runs = self.state.tables.runs((self.module_name, self.layer_index, "a"),
                                      lambda: prepare_runs(pool, row_runs(offsets, ranks, x.shape[1]), x.shape[1], True))
        shrink_torch(x, pool, offsets, ranks, tokens, buf, plan=self.state.token_plan(x.shape[0]), runs=runs)

    def _expand(self, buf, pool, offsets, ranks, scalings, tokens, y, meta, which: str) -> None:
        if y.is_cuda and self.state.use_triton:
            paged_lora_expand(buf, pool, offsets, ranks, scalings, tokens, y, self.out_sizes, meta)
            return
        runs = self.state.tables.runs((self.module_name, self.layer_index, which),
                                      lambda: prepare_runs(pool, row_runs(offsets, ranks, self.out_sizes),
                                                           self.out_sizes, False))
        expand_torch(buf, pool, offsets, ranks, scalings, tokens, y, self.out_sizes,
                     plan=self.state.token_plan(y.shape[0]), runs=runs)

    def extra_repr(self) -> str:
        return f"module={self.module_name}, layer={self.layer_index}, out_sizes={self.out_sizes}"


def slice_out_sizes(base: BaseModelShape, module_name: str, tp_size: int, tp_rank: int) -> tuple[int, ...]:
    """Output width, on this TP rank, of every slice of a paged module."""
    shard = base.for_tp(tp_size, tp_rank)
    return tuple(stop - start for start, stop in (shard.out_range(p) for p in PAGED_MODULES[module_name]))


def install_paged_layers(
    model: nn.Module, state: StepState, base: BaseModelShape, linear_types: tuple[type, type],
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
        wrapper = PagedLoRALinear(module, leaf, layer, out_sizes, state, tp, row_parallel, out_start)
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, leaf, wrapper)
        installed.append(wrapper)
    return installed
