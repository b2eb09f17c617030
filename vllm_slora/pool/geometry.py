"""The one page-size computation: how many adapter elements a block holds per layer.

A block id owns one page in every layer's KV tensor; adapters are stored in those pages
in the model dtype (kernels/page_layout.py). Everyone who sizes adapters in blocks (the
scheduler, the workers, the API server's validator) goes through `page_elems`, so they
cannot disagree, e.g. about an fp8 KV cache whose pages hold half the bytes.
"""

from __future__ import annotations

import torch


def kv_page_bytes(block_size: int, num_kv_heads: int, head_dim: int, kv_itemsize: int) -> int:
    """Bytes of one layer's page of one block on one TP rank: K and V of block_size tokens."""
    return block_size * num_kv_heads * head_dim * 2 * kv_itemsize


def page_elems(page_size_bytes: int, dtype: torch.dtype) -> int:
    """Elements of ``dtype`` (the adapters' dtype) in one layer's page of one block."""
    if page_size_bytes <= 0 or page_size_bytes % dtype.itemsize:
        raise ValueError(f"a KV page of {page_size_bytes} bytes does not hold whole {dtype} elements")
    return page_size_bytes // dtype.itemsize
