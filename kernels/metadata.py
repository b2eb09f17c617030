"""Per-step token grouping for the paged LoRA ops, kept in preallocated tensors.

The segment (prefill) form of the kernels wants the batch's tokens grouped by adapter;
the torch/CPU path wants the same grouping. `PagedLoRAMeta.prepare` computes it once
per step, on the device, with fixed-shape ops writing into buffers allocated once for
the largest batch. Nothing here reads a device value on the host, so `prepare` can run
before a captured CUDA graph is replayed (its buffers keep their addresses) and the ops
that read them never synchronize.

Grouping (of the map given to `prepare`, ``A_max`` adapter rows, ``M = tile_tokens``)::

    key[t]            = token_adapter[t], or A_max when it is -1 (no adapter: sorts last)
    token_order       = stable argsort of key            -> tokens of adapter 0, 1, ..., none
    adapter_starts[a] = first position of adapter a in token_order; [a+1] - [a] = its count
    tiles[:, i]       = (adapter, start in token_order, length <= M) of tile i;
                        tiles cover each adapter's run in chunks of M, adapter -1 = unused

Tokens mapped to -1 get no tile. The tiles in use are at most ``ceil(n / M) + min(A_max,
n)`` for the ``n`` tokens that have an adapter (each adapter wastes at most one partial
tile). The worker prepares over all ``max_tokens`` entries of its token map, whose
entries past the step's tokens are -1, so every adapted token is among the batch's
first ``T`` and the segment grid ``max_tiles(T, A_max, M)`` covers every tile in use.
That grid comes from the batch's ``T`` and the static ``A_max`` and ``M`` only (never
from the step's tiles, adapters or ``max_tokens``); programs of unused tiles (adapter
-1) exit at once.
"""

from __future__ import annotations

import torch

DEFAULT_TILE_TOKENS = 32
# Batches at least this large take the segment form on CUDA (untuned guess: decode
# batches stay per-token, prefill chunks go segment).
DEFAULT_SEGMENT_MIN_TOKENS = 128


def max_tiles(num_tokens: int, max_adapters: int, tile_tokens: int) -> int:
    """Upper bound on the tiles a batch of ``num_tokens`` can need (the segment grid)."""
    return -(-num_tokens // tile_tokens) + min(max_adapters, num_tokens)


class PagedLoRAMeta:
    """Token->adapter grouping for one step, updated in place by `prepare`."""

    def __init__(
        self,
        max_tokens: int,
        max_adapters: int,
        device: torch.device | str,
        tile_tokens: int = DEFAULT_TILE_TOKENS,
        segment_min_tokens: int = DEFAULT_SEGMENT_MIN_TOKENS,
    ) -> None:
        assert max_tokens > 0 and max_adapters > 0, "max_tokens and max_adapters must be positive"
        assert tile_tokens >= 16 and tile_tokens & (tile_tokens - 1) == 0, (
            f"tile_tokens must be a power of two >= 16 (tl.dot tile), got {tile_tokens}"
        )
        self.max_tokens = max_tokens
        self.max_adapters = max_adapters
        self.tile_tokens = tile_tokens
        self.segment_min_tokens = segment_min_tokens
        self.device = torch.device(device)
        self.num_tokens = 0
        i64 = dict(dtype=torch.int64, device=self.device)
        i32 = dict(dtype=torch.int32, device=self.device)
        n_tiles = max_tiles(max_tokens, max_adapters, tile_tokens)
        self.token_order = torch.zeros(max_tokens, **i64)  # [max_tokens]
        self.adapter_starts = torch.zeros(max_adapters + 2, **i64)  # [A_max + 2]
        self.tiles = torch.full((3, n_tiles), -1, **i32)  # [3, max tiles]
        # Scratch, also fixed-size so that prepare allocates nothing that outlives it.
        self._sorted_keys = torch.zeros(max_tokens, **i64)
        self._counts = torch.zeros(max_adapters + 1, **i64)
        self._ones = torch.ones(max_tokens, **i64)
        self._tile_ids = torch.arange(n_tiles, **i64)

    def prepare(self, token_adapter: torch.Tensor) -> None:
        """Group the step's tokens by adapter (in place, no host sync).

        Args:
            token_adapter: int32 [T], adapter row per token, -1 for none; T <= max_tokens.
        """
        num_tokens = token_adapter.shape[0]
        assert num_tokens <= self.max_tokens, f"{num_tokens} tokens exceed max_tokens={self.max_tokens}"
        assert token_adapter.device == self.device, "token_adapter must be on the meta's device"
        self.num_tokens = num_tokens
        a_max, tile = self.max_adapters, self.tile_tokens
        key = token_adapter.to(torch.int64).masked_fill(token_adapter < 0, a_max)
        torch.sort(key, stable=True, out=(self._sorted_keys[:num_tokens], self.token_order[:num_tokens]))

        counts = self._counts
        counts.zero_()
        counts.scatter_add_(0, key, self._ones[:num_tokens])
        self.adapter_starts[0] = 0
        torch.cumsum(counts, 0, out=self.adapter_starts[1:])

        # Tile i belongs to the adapter whose cumulative tile count first exceeds i.
        adapter_counts = counts[:a_max]
        tiles_per_adapter = (adapter_counts + tile - 1) // tile
        tile_ends = torch.cumsum(tiles_per_adapter, 0)
        tile_adapter = torch.searchsorted(tile_ends, self._tile_ids, right=True)
        used = tile_adapter < a_max
        adapter = tile_adapter.clamp(max=a_max - 1)
        local = self._tile_ids - (tile_ends[adapter] - tiles_per_adapter[adapter])
        start = self.adapter_starts[adapter] + local * tile
        length = (adapter_counts[adapter] - local * tile).clamp(max=tile)
        self.tiles[0].copy_(torch.where(used, adapter, -1))
        self.tiles[1].copy_(start)
        self.tiles[2].copy_(torch.where(used, length, 0))

    def num_tiles(self, num_tokens: int) -> int:
        """Grid size of the segment kernels for a batch of ``num_tokens`` tokens."""
        return max_tiles(num_tokens, self.max_adapters, self.tile_tokens)
