"""Paged heterogeneous-rank LoRA kernels (torch reference + Triton). Imports torch/triton only.

    meta = PagedLoRAMeta(max_tokens, max_adapters, device)       # once
    meta.prepare(token_adapter)                                   # once per step
    paged_lora_shrink(x, pool, a_row_offsets, ranks, token_adapter, buf, meta)
    paged_lora_expand(buf, pool, b_row_offsets, ranks, scalings, token_adapter, y, out_sizes, meta)
"""

from .metadata import PagedLoRAMeta
from .ops import HAS_TRITON, paged_lora_expand, paged_lora_linear, paged_lora_shrink
from .packing import PackedRows, lora_layer_layout, lora_matrix_specs, pack_lora_layer
from .slot_tables import RowTables, SlotTables, build_row_tables
from .torch_ops import expand_torch, row_runs, rows_are_contiguous, shrink_torch

__all__ = [
    "HAS_TRITON",
    "PackedRows",
    "PagedLoRAMeta",
    "RowTables",
    "SlotTables",
    "build_row_tables",
    "expand_torch",
    "lora_layer_layout",
    "lora_matrix_specs",
    "pack_lora_layer",
    "paged_lora_expand",
    "paged_lora_linear",
    "paged_lora_shrink",
    "row_runs",
    "rows_are_contiguous",
    "shrink_torch",
]
