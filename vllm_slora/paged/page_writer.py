"""Copy a page-packed adapter into its pool blocks, one indexed copy per layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .packing import PackedAdapter


def write_pages(packed: PackedAdapter, pools: Sequence[torch.Tensor], block_ids: Sequence[int]) -> None:
    """Put layer l's packed pages into layer l's pages of ``block_ids`` (in order).

    ``pools[l]`` is layer l's flat pool view [num_blocks * page_elems] in the adapter
    dtype. Only the adapter's own pages are written: every other byte of the pool,
    KV or another adapter, is untouched.
    """
    if len(pools) != len(packed.pages):
        raise ValueError(f"adapter has {len(packed.pages)} layers, the pool {len(pools)}")
    if len(block_ids) < packed.num_pages:
        raise ValueError(
            f"adapter {packed.spec.name!r} needs {packed.num_pages} blocks, the plan gave {len(block_ids)}"
        )
    device = pools[0].device
    blocks = torch.as_tensor(list(block_ids), dtype=torch.int64, device=device)
    for pool, pages in zip(pools, packed.pages):
        by_page = pool.view(-1, packed.page_elems)  # [num_blocks, page_elems]
        # non_blocking: the host tensor outlives the copy (it stays in the host cache or
        # in `packed`), and the copy is ordered on the stream the forward runs on.
        by_page[blocks[: pages.shape[0]]] = pages.to(device, non_blocking=True)
