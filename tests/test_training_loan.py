"""Pool blocks lent to co-served training's layer graphs, on a real vLLM BlockPool: lent while
the KV cache can spare them, called back under KV pressure, not taken again at once; their
pages' RAM goes back to the OS in the worker (paged/lent_pages.py)."""

from __future__ import annotations

import psutil
import pytest
import torch

from vllm_slora.paged.lent_pages import OS_PAGE, release_pages
from vllm_slora.pool import training_loan
from vllm_slora.pool.residency import AdapterResidency, Residency
from vllm_slora.pool.training_loan import TrainingLoan
from vllm_slora.step_plan import AdapterPlacement

BLOCK_BYTES = 1000


@pytest.fixture
def pool():
    from vllm.v1.core.block_pool import BlockPool

    return BlockPool(num_gpu_blocks=33, enable_caching=True, hash_block_size=16)  # 32 usable


def test_lent_while_the_kv_cache_can_spare_it_recalled_under_pressure(pool):
    loan = TrainingLoan(pool, BLOCK_BYTES)
    assert (loan.spare(), loan.lend_floor()) == (8, 12)  # 25 % / 37.5 % of 33 blocks
    lent = loan.try_lend(10 * BLOCK_BYTES - 1)  # whole blocks
    assert len(lent) == 10 == len(set(lent)) and 0 not in lent and pool.get_num_free_blocks() == 22
    assert loan.try_lend(10 * BLOCK_BYTES) is None  # nothing more wanted
    assert loan.try_lend(12 * BLOCK_BYTES) is not None and loan.num_blocks == 12  # topped up
    assert not loan.under_pressure()

    kv = pool.get_new_blocks(13)  # the KV cache grows: 7 free < 8 spare
    assert set(b.block_id for b in kv).isdisjoint(b.block_id for b in loan.blocks)
    assert loan.under_pressure()
    loan.recall()
    assert loan.num_blocks == 0 and pool.get_num_free_blocks() == 19 and loan.recalls == 1
    # Right after a recall only what keeps 37.5 % free may be lent again (19 - 12 = 7 blocks):
    # not when 7 blocks hold less than two layers' graphs, ...
    assert loan.try_lend(10 * BLOCK_BYTES, layer_bytes=4 * BLOCK_BYTES) is None
    # ... nor while requests run (partial=False: only a loan lent in full) ...
    assert loan.try_lend(10 * BLOCK_BYTES, layer_bytes=BLOCK_BYTES, partial=False) is None
    # ... else part of the loan (the pass keeps that many layers' graphs), never below the floor.
    assert len(loan.try_lend(10 * BLOCK_BYTES, layer_bytes=3 * BLOCK_BYTES)) == 7
    assert pool.get_num_free_blocks() == 12 and not loan.under_pressure()
    assert loan.try_lend(10 * BLOCK_BYTES, layer_bytes=BLOCK_BYTES) is None  # no room left

    pool.free_blocks(kv)  # the KV cache shrinks again: the loan is topped up to what is wanted
    assert len(loan.try_lend(10 * BLOCK_BYTES, layer_bytes=3 * BLOCK_BYTES)) == 3
    assert loan.num_blocks == 10 and pool.get_num_free_blocks() == 22


def test_a_small_pool_lends_part_of_what_is_wanted(pool):
    """Graphs wanted beyond what the pool can spare: it lends what keeps 37.5 % free (a pass
    keeps that many layers' graphs) rather than nothing."""
    loan = TrainingLoan(pool, BLOCK_BYTES)
    lent = loan.try_lend(30 * BLOCK_BYTES, layer_bytes=2 * BLOCK_BYTES)
    assert len(lent) == 33 - 12 - 1 == 20 and pool.get_num_free_blocks() == loan.lend_floor() == 12


def test_a_loan_takes_warm_adapter_blocks_only_as_any_allocation_would(pool, monkeypatch):
    evicted = []
    residency = AdapterResidency(pool, on_evict=evicted.append)
    residency.pin(1, 4, lambda ids: AdapterPlacement(1, "a1", "/p/1", 1, ids))
    residency.unpin(1)  # warm: the tail of the free queue
    kv = pool.get_new_blocks(26)  # 6 free: 2 plain, then the adapter's 4
    monkeypatch.setattr(training_loan, "LEND_SHARE", 0.0)
    loan = TrainingLoan(pool, BLOCK_BYTES)
    assert len(loan.try_lend(2 * BLOCK_BYTES)) == 2 and evicted == [] and residency.state(1) is Residency.CACHED
    assert len(loan.try_lend(3 * BLOCK_BYTES)) == 1 and evicted == [1]  # a block of the adapter: it is gone
    assert residency.state(1) is Residency.ABSENT
    pool.free_blocks(kv)


def rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("page_bytes", [1 << 20, 1 << 20 | 4000], ids=["page-aligned", "unaligned-pages"])
def test_lent_pages_give_their_ram_back_and_leave_every_other_byte(page_bytes):
    num_blocks, layers = 48, 2
    pools = [torch.ones(num_blocks * page_bytes // 4, dtype=torch.float32) for _ in range(layers)]
    lent = [5, 6, 7, 20, 30, 31]
    before = rss()
    released = release_pages(pools, lent, page_bytes)
    # Inside each lent block's page, all but at most two partial OS pages are released.
    assert released >= layers * len(lent) * (page_bytes - 2 * OS_PAGE)
    assert before - rss() >= 0.8 * released
    for pool in pools:
        by_byte = pool.view(torch.uint8)
        for block in range(num_blocks):
            page = by_byte[block * page_bytes:(block + 1) * page_bytes].view(-1)
            if block not in lent:
                assert bool((pool[block * page_bytes // 4:(block + 1) * page_bytes // 4] == 1).all()), block
            else:  # released pages read as zeros; bytes of the neighbours' OS pages are kept
                assert int((page == 0).sum()) >= page_bytes - 2 * OS_PAGE
