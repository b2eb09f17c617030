"""Blocks of the unified pool lent to co-served training (EngineCore process).

A micro-batch trains about a quarter faster when every layer keeps its autograd graph
from forward to backward instead of recomputing it (finetune/layer_units.py), but those
graphs are large (~470 MB for 256 tokens on the 135M default model). They are worth
having only while the KV cache does not need the memory. So, like adapters (S-LoRA), the
graphs borrow ordinary KV blocks of vLLM's `BlockPool`:

* the workers report the graph bytes their jobs' next micro-batches would keep (capped by
  ``slora.finetune_activation_mb``); the scheduler takes as many blocks of that as the pool
  can give while it keeps ``LEND_SHARE`` of its blocks free beside them (`get_new_blocks`:
  KV and warm adapters give them up as for any allocation; the loan is topped up as room
  appears) and tells the workers; a worker hands the lent pages' RAM back to the OS
  (paged/lent_pages.py), so its graphs live in that memory, and a pass keeps as many of
  its layers' graphs as the loan holds (a small pool lends part, not nothing);
* as soon as fewer than ``SPARE_SHARE`` of the blocks are free, the loan is called in: the
  blocks are freed for the KV cache in that very step and the workers drop the graphs
  before the step's forward writes the pages (backward then recomputes each layer from
  its boundary: no work is lost, the pass goes on, only slower);
* the gap between the two shares is the hysteresis: right after a recall the pool is below
  ``LEND_SHARE`` free, so the loan is not taken again until the KV cache has shrunk.

Only the graphs borrow. Layer boundaries, one loss unit and the jobs' LoRA + AdamW state
are small and kept out of the KV cache at start-up (finetune/memory.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# A loan is called back when fewer than this share of the pool's blocks are free (KV
# headroom; the scheduler's prefetch keeps the same share spare) ...
SPARE_SHARE = 0.25
# ... and taken (or topped up) only while this share stays free beside it.
LEND_SHARE = 0.375


@dataclass
class TrainingLoan:
    block_pool: object  # vllm.v1.core.block_pool.BlockPool
    block_bytes: int  # bytes one block id holds across every layer (one TP rank)
    blocks: list = field(default_factory=list)  # KVCacheBlock objects now lent
    lends: int = 0
    recalls: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def nbytes(self) -> int:
        return len(self.blocks) * self.block_bytes

    def spare(self) -> int:
        return int(self.block_pool.num_gpu_blocks * SPARE_SHARE)

    def lend_floor(self) -> int:
        return int(self.block_pool.num_gpu_blocks * LEND_SHARE)

    def blocks_for(self, num_bytes: int) -> int:
        return math.ceil(num_bytes / self.block_bytes) if num_bytes > 0 else 0

    def under_pressure(self) -> bool:
        """The KV cache wants the lent blocks back: fewer than `spare` free beside them."""
        return bool(self.blocks) and self.block_pool.get_num_free_blocks() < self.spare()

    def try_lend(self, num_bytes: int, layer_bytes: int = 0, partial: bool = True) -> list[int] | None:
        """Bring the loan towards `num_bytes` (never smaller: only a recall shrinks it) while the
        pool keeps `lend_floor` blocks free beside it; returns the ids of the blocks lent now,
        or None (nothing more wanted, or no room).

        Where the room is short of what is wanted, the blocks there are lent if they hold at
        least two of `layer_bytes` (one layer's graph): a pass keeps as many layers' graphs
        as its budget holds (layer_units.py), so a partial loan buys its share of the speed,
        and two layers' worth also covers the layer boundaries of the first loan. Smaller
        top-ups would buy nothing and cost a release of pages each. ``partial=False`` lends
        only what is missing in full (the scheduler's choice while requests run: a loan
        topped up as the KV cache ebbs and recalled as it flows would make the KV cache
        fault its pages back in again and again, in inference steps).
        """
        missing = self.blocks_for(num_bytes) - len(self.blocks)
        room = self.block_pool.get_num_free_blocks() - self.lend_floor()
        count = min(missing, room)
        if count <= 0 or (count < missing and (not partial or count * self.block_bytes < 2 * layer_bytes)):
            return None
        new = self.block_pool.get_new_blocks(count)
        self.blocks += new
        self.lends += 1
        return [b.block_id for b in new]

    def recall(self) -> None:
        """Give every lent block back to the KV cache (plain free blocks)."""
        if self.blocks:
            self.block_pool.free_blocks(self.blocks)
            self.blocks = []
            self.recalls += 1


def graphs_borrow_pool_blocks() -> bool:
    """Whether this platform's workers can back their graphs with lent blocks' memory: a CPU
    worker returns the pages to the OS and its heap takes the RAM back. A GPU worker cannot
    hand KV-tensor memory to its allocator, so there the graphs' budget is kept out of the
    KV cache at start-up instead (finetune/memory.py)."""
    from vllm_slora.compat import current_platform

    return current_platform.is_cpu()
