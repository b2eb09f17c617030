"""The paged LoRA ops from kernels/, wherever that package is importable from.

Installed, `kernels/` is the subpackage `vllm_slora.kernels`; in a bare checkout
(tests run from the repository root) it is the top-level package `kernels`.
"""

from __future__ import annotations

try:
    from vllm_slora.kernels import PagedLoRAMeta, paged_lora_expand, paged_lora_linear, paged_lora_shrink
except ImportError:  # not installed: running from the repository root
    from kernels import PagedLoRAMeta, paged_lora_expand, paged_lora_linear, paged_lora_shrink

__all__ = ["PagedLoRAMeta", "paged_lora_expand", "paged_lora_linear", "paged_lora_shrink"]
