"""Adapter residency on a real vLLM BlockPool: pin, warm cache, reclaim under KV pressure."""

from __future__ import annotations

import pytest

from vllm_slora.pool.residency import AdapterResidency, Residency
from vllm_slora.step_plan import AdapterPlacement


@pytest.fixture
def pool():
    from vllm.v1.core.block_pool import BlockPool

    return BlockPool(num_gpu_blocks=33, enable_caching=True, hash_block_size=16)


def describe(lora_id):
    return lambda block_ids: AdapterPlacement(lora_id, f"a{lora_id}", f"/p/{lora_id}", 1, block_ids)


def test_pin_takes_exactly_the_blocks_asked_for(pool):
    res = AdapterResidency(pool)
    placement, needs_load = res.pin(1, 5, describe(1))
    assert needs_load and len(placement.block_ids) == 5 and 0 not in placement.block_ids
    assert pool.get_num_free_blocks() == 32 - 5
    assert res.pin(1, 5, describe(1)) == (placement, False)  # already pinned: no new blocks
    assert pool.get_num_free_blocks() == 32 - 5
    stats = res.stats()
    assert (stats.pinned_adapters, stats.pinned_adapter_blocks, stats.kv_blocks) == (1, 5, 0)


def test_unpinned_adapter_stays_warm_and_counts_as_free(pool):
    res = AdapterResidency(pool)
    placement, _ = res.pin(1, 4, describe(1))
    res.unpin(1)
    assert res.state(1) is Residency.CACHED
    assert pool.get_num_free_blocks() == 32  # reclaimable, so counted free
    again, needs_load = res.pin(1, 4, describe(1))
    assert again.block_ids == placement.block_ids and not needs_load
    assert pool.get_num_free_blocks() == 28


def test_kv_pressure_reclaims_cached_adapters_last(pool):
    evicted = []
    res = AdapterResidency(pool, on_evict=evicted.append)
    res.pin(1, 4, describe(1))
    res.unpin(1)
    kv = pool.get_new_blocks(28)  # every truly free block: the cached adapter survives
    assert evicted == [] and res.state(1) is Residency.CACHED
    kv += pool.get_new_blocks(1)  # now KV needs one of the adapter's blocks
    assert evicted == [1] and res.state(1) is Residency.ABSENT
    pool.free_blocks(kv)
    placement, needs_load = res.pin(1, 4, describe(1))
    assert needs_load  # pages were overwritten: the worker must refill them
    assert res.stats().loads == 2 and res.stats().evictions == 1


def test_pin_fails_without_room_and_succeeds_after_release(pool):
    res = AdapterResidency(pool)
    res.pin(1, 20, describe(1))
    assert res.pin(2, 20, describe(2)) is None  # would need 20, only 12 free: wait
    assert res.state(2) is Residency.ABSENT
    res.retain_only(set())  # adapter 1 no longer used by a running request
    placement, needs_load = res.pin(2, 20, describe(2))
    assert needs_load and len(placement.block_ids) == 20
    assert res.state(1) is Residency.ABSENT  # its cached blocks were reclaimed for 2


def test_repinned_adapter_is_not_evicted_by_stale_watchers(pool):
    evicted = []
    res = AdapterResidency(pool, on_evict=evicted.append)
    res.pin(1, 4, describe(1))
    res.unpin(1)
    res.pin(1, 4, describe(1))  # touch: back to pinned
    kv = pool.get_new_blocks(pool.get_num_free_blocks())
    assert evicted == [] and res.state(1) is Residency.PINNED
    pool.free_blocks(kv)
    res.unpin(1)
    pool.get_new_blocks(pool.get_num_free_blocks())
    assert evicted == [1]


def test_drop_all_cached_keeps_pinned(pool):
    evicted = []
    res = AdapterResidency(pool, on_evict=evicted.append)
    res.pin(1, 3, describe(1))
    res.pin(2, 3, describe(2))
    res.unpin(2)
    res.drop_all_cached()
    assert evicted == [2] and res.state(1) is Residency.PINNED and res.state(2) is Residency.ABSENT
    assert pool.reset_prefix_cache() is False  # adapter 1 still pinned
    res.retain_only(set())
    res.drop_all_cached()
    assert pool.reset_prefix_cache() is True


def test_stats_running_totals_match_a_recount(pool):
    """stats() keeps running totals; after every operation they equal a walk over the entries."""
    import random

    rng = random.Random(0)
    evicted = []
    res = AdapterResidency(pool, on_evict=evicted.append)
    kv = []
    for _ in range(500):
        op = rng.randrange(7)
        lora_id = rng.randint(1, 6)
        if op <= 1:
            res.pin(lora_id, rng.randint(1, 6), describe(lora_id))
        elif op == 2:
            res.unpin(lora_id)
        elif op == 3:
            res.retain_only(set(rng.sample(range(1, 7), rng.randint(0, 3))))
        elif op == 4:
            if rng.random() < 0.5:
                res.forget(lora_id)
            else:
                res.drop_all_cached()
        elif op == 5:  # KV allocation: may reclaim cached adapters' blocks
            n = rng.randint(0, pool.get_num_free_blocks())
            kv += pool.get_new_blocks(n)
        elif kv:  # KV release
            rng.shuffle(kv)
            k = rng.randint(1, len(kv))
            freed, kv = kv[:k], kv[k:]
            pool.free_blocks(freed)
        entries = list(res._entries.values())
        pinned = [e for e in entries if e.state is Residency.PINNED]
        cached = [e for e in entries if e.state is Residency.CACHED]
        stats = res.stats()
        assert (stats.pinned_adapters, stats.cached_adapters) == (len(pinned), len(cached))
        assert stats.pinned_adapter_blocks == sum(len(e.blocks) for e in pinned)
        assert stats.cached_adapter_blocks == sum(len(e.blocks) for e in cached)
        assert stats.free_blocks == pool.get_num_free_blocks()
    assert res.stats().evictions > 0 and res.stats().loads > res.stats().evictions  # reclaims were exercised
