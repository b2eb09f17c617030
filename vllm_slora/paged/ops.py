"""The paged LoRA ops from kernels/, wherever that package is importable from.

Installed, `kernels/` is the subpackage `vllm_slora.kernels`; in a bare checkout
(tests run from the repository root) it is the top-level package `kernels`.
"""

from __future__ import annotations

try:
    from vllm_slora.kernels import (
        HAS_TRITON,
        PagedLoRAMeta,
        SlotTables,
        cpu_native,
        paged_lora_expand,
        paged_lora_shrink,
    )
    from vllm_slora.kernels.packing import write_rows
    from vllm_slora.kernels.torch_ops import (
        PreparedRuns,
        TokenPlan,
        expand_torch,
        plan_tokens,
        prepare_runs,
        row_runs,
        shrink_torch,
    )
except ImportError:  # not installed: running from the repository root
    from kernels import HAS_TRITON, PagedLoRAMeta, SlotTables, cpu_native, paged_lora_expand, paged_lora_shrink
    from kernels.packing import write_rows
    from kernels.torch_ops import (
        PreparedRuns,
        TokenPlan,
        expand_torch,
        plan_tokens,
        prepare_runs,
        row_runs,
        shrink_torch,
    )

__all__ = [
    "HAS_TRITON", "PagedLoRAMeta", "PreparedRuns", "SlotTables", "TokenPlan", "cpu_native", "expand_torch",
    "paged_lora_expand", "paged_lora_shrink", "plan_tokens", "prepare_runs", "row_runs", "shrink_torch", "write_rows",
]
