"""Each layer's KV tensor seen as a flat array of adapter-dtype elements.

Block id b owns elements [b * page_elems, (b + 1) * page_elems) of every layer's view
(kernels/page_layout.py). That holds when the layer's tensor is contiguous and blocks
are its outermost dimension, which is checked here rather than assumed: the CPU
backend's LBHNC layout and the GPU default LBNHC both qualify (a kernel block size
smaller than the block only splits the outer dimension).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_slora.pool.geometry import page_elems


def flat_pool_views(
    kv_caches: Sequence[torch.Tensor], num_blocks: int, page_bytes: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """[num_blocks * page_elems] views of ``dtype`` sharing the KV tensors' memory."""
    page_elems(page_bytes, dtype)  # raises unless a page holds whole elements
    views = []
    for layer, kv in enumerate(kv_caches):
        nbytes = kv.numel() * kv.element_size()
        outer = kv.shape[0]
        if (
            not kv.is_contiguous()
            or nbytes != num_blocks * page_bytes
            or outer % num_blocks
            or kv.stride(0) * kv.element_size() * (outer // num_blocks) != page_bytes
        ):
            raise NotImplementedError(
                f"vllm-slora needs layer {layer}'s KV cache as one contiguous tensor with blocks "
                f"outermost (page {page_bytes} B, {num_blocks} blocks); got shape {tuple(kv.shape)}, "
                f"strides {kv.stride()}, {kv.dtype}. The attention backend's KV layout is not supported."
            )
        views.append(kv.view(-1).view(torch.uint8).view(dtype))
    return views
