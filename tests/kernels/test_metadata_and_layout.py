"""PagedLoRAMeta grouping/tiles, and the row-run helpers of the torch path."""

from __future__ import annotations

import pytest
import torch

from kernels import PagedLoRAMeta, pack_lora_layer, row_runs, rows_are_contiguous
from kernels.packing import lora_layer_layout
from kernels.torch_ops import group_tokens


@pytest.mark.parametrize("num_tokens", [1, 5, 37, 200])
@pytest.mark.parametrize("tile_tokens", [16, 32])
def test_tiles_cover_every_adapter_token_once(num_tokens, tile_tokens):
    gen = torch.Generator().manual_seed(num_tokens)
    num_adapters = 9
    token_adapter = torch.randint(-1, num_adapters, (num_tokens,), generator=gen, dtype=torch.int32)
    meta = PagedLoRAMeta(256, 12, "cpu", tile_tokens=tile_tokens)
    meta.prepare(token_adapter)
    order = meta.token_order[:num_tokens]
    seen = []
    for adapter, start, length in meta.tiles[:, : meta.num_tiles(num_tokens)].t().tolist():
        if adapter < 0:
            continue
        assert 0 < length <= tile_tokens
        tokens = order[start : start + length]
        assert torch.all(token_adapter[tokens] == adapter)
        seen += tokens.tolist()
    expected = (token_adapter >= 0).nonzero().squeeze(1).tolist()
    assert sorted(seen) == expected  # each token with an adapter exactly once
    assert int((meta.tiles[0, meta.num_tiles(num_tokens) :] >= 0).sum()) == 0  # grid bound holds
    starts = meta.adapter_starts
    for a in range(num_adapters):
        assert torch.all(token_adapter[order[starts[a] : starts[a + 1]]] == a)


def test_prepare_reuses_its_buffers():
    meta = PagedLoRAMeta(64, 4, "cpu")
    buffers = [meta.token_order.data_ptr(), meta.tiles.data_ptr(), meta.adapter_starts.data_ptr()]
    for n in (3, 64, 10):
        meta.prepare(torch.randint(-1, 4, (n,), dtype=torch.int32))
    assert buffers == [meta.token_order.data_ptr(), meta.tiles.data_ptr(), meta.adapter_starts.data_ptr()]


def test_group_tokens_detects_consecutive_runs():
    token_adapter = torch.tensor([1, 1, 1, 0, -1, 0, 2], dtype=torch.int32)
    groups = {g.adapter: g.tokens for g in group_tokens(token_adapter, 3)}
    assert groups[1] == slice(0, 3)
    assert groups[2] == slice(6, 7)
    assert groups[0].tolist() == [3, 5]


def _packed(page_elems: int, block_ids, rank: int = 8, row_len: int = 10):
    pool = torch.zeros(20 * page_elems)
    a = torch.randn(rank, row_len)
    b = torch.randn(row_len, rank)
    return pack_lora_layer(pool, page_elems, block_ids, [a], [b]), pool, a


def test_rows_filling_consecutive_pages_are_one_run():
    packed, pool, a = _packed(page_elems=40, block_ids=[3, 4, 5, 6])  # 4 rows of 10 per page
    offsets = packed.a_offsets[0][None, None]
    ranks = torch.tensor([[8]], dtype=torch.int32)
    assert rows_are_contiguous(offsets, ranks, 10).item()
    assert row_runs(offsets, ranks, 10) == {(0, 0): [(0, 8, 3 * 40)]}


def test_shuffled_pages_split_into_runs_that_read_the_right_rows():
    packed, pool, a = _packed(page_elems=35, block_ids=[7, 2, 9, 4, 11, 0])  # 3 rows per page, gap of 5
    offsets = packed.a_offsets[0][None, None]
    ranks = torch.tensor([[8]], dtype=torch.int32)
    assert not rows_are_contiguous(offsets, ranks, 10).item()
    runs = row_runs(offsets, ranks, 10)[(0, 0)]
    assert [(j0, j1) for j0, j1, _ in runs] == [(0, 3), (3, 6), (6, 8)]
    for j0, j1, off in runs:
        assert torch.equal(pool[off : off + (j1 - j0) * 10].view(j1 - j0, 10), a[j0:j1])


def test_layout_blocks_match_the_lead_layout():
    layout = lora_layer_layout([4, 0, 2], in_features=10, out_sizes=[6, 6, 3], page_elems=35)
    assert len(layout.placements) == 6 and layout.num_pages >= 2
