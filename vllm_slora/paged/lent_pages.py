"""Hand the RAM of pool pages lent to training back to the OS (CPU workers).

When the scheduler lends blocks to co-served training (pool/training_loan.py), nothing
will read those pages until the loan is called back, and the KV cache writes a page in
full before it reads it. So a CPU worker tells the kernel their contents may go
(``madvise(MADV_DONTNEED)``): the RAM is freed at once and the training graphs allocated
next reuse it; a page the KV cache writes after a recall is faulted back in as zeros.
Only whole OS pages inside a block's page are released, so no byte of a neighbouring
block (KV or adapter) is ever touched.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Sequence

import torch

from vllm_slora.libc import libc

MADV_DONTNEED = 4  # Linux <sys/mman.h>
OS_PAGE = mmap.PAGESIZE


def release_pages(
    pools: Sequence[torch.Tensor],  # each layer's flat pool view [num_blocks * page_elems] (CPU)
    block_ids: Sequence[int],
    page_bytes: int,  # bytes of one block's page in one layer
) -> int:
    """Release the RAM of `block_ids`' pages in every layer; returns the bytes released
    (0 where madvise is unavailable or the pool is not in host memory)."""
    c = libc()
    if c is None or not block_ids or not pools or pools[0].device.type != "cpu":
        return 0
    madvise = c.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for pool in pools:
        base = pool.data_ptr()
        limit = base + pool.numel() * pool.element_size()
        for first_block, end_block in _runs(block_ids):  # one call per run of adjacent blocks
            start = base + first_block * page_bytes
            end = min(base + end_block * page_bytes, limit)
            first = -(-start // OS_PAGE) * OS_PAGE  # whole OS pages inside [start, end) only
            last = end // OS_PAGE * OS_PAGE
            if last > first and madvise(first, last - first, MADV_DONTNEED) == 0:
                released += last - first
    return released


def _runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """[first, end) ranges of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for block in sorted(set(block_ids)):
        if runs and runs[-1][1] == block:
            runs[-1] = (runs[-1][0], block + 1)
        else:
            runs.append((block, block + 1))
    return runs
