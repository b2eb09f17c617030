"""An adapter's life in the worker: read off the step, checked against what the scheduler
sized, failed alone when its files changed, dropped on unload (issue #9 A, 1, 3, 4, 5, 7).

No engine here: the worker's PagedAdapterManager on a fake pool, the same set-up as
test_paged_worker_layers.py. The engine-level scenarios are in test_adapter_lifecycle_engine.py.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
import torch

from tests.test_paged_worker_layers import NUM_BLOCKS, PAGE_ELEMS, TINY, check_all_layers, make_pools, place
from vllm_slora.adapters import BaseModelShape
from vllm_slora.adapters.generate import generate_adapters
from vllm_slora.adapters.validation import adapter_files_identity
from vllm_slora.paged import host_cache as host_cache_module
from vllm_slora.paged.manager import PagedAdapterManager
from vllm_slora.step_plan import AdapterPlacement, AdapterSource, SLoRAStepPlan


@pytest.fixture(scope="module")
def base() -> BaseModelShape:
    return BaseModelShape.from_hf_config(TINY, dtype=torch.float32)


@pytest.fixture
def adapters(tmp_path):
    """(lora_int_id, name, path): three rank-4/8/16 adapters and one rank-32, fresh per test
    (tests rewrite files)."""
    found = generate_adapters(TINY, tmp_path / "a", 3, ranks=(4, 8, 16), seed=7, name_prefix="all")
    found += generate_adapters(TINY, tmp_path / "a", 1, ranks=(32,), seed=9, name_prefix="big")
    return [(10 + i, a.name, str(a.path)) for i, a in enumerate(found)]


@pytest.fixture
def manager(base):
    m = PagedAdapterManager(base, torch.float32, "cpu", 64 << 20, max_num_tokens=32, max_adapters_per_step=6,
                            kernel_backend="torch")
    m.attach_pool(make_pools(), PAGE_ELEMS)
    return m


def source(adapter, version: int = 1) -> AdapterSource:
    lora_int_id, name, path = adapter
    return AdapterSource(name, path, version, lora_int_id, adapter_files_identity(path))


def replace_files(src: str, dst: str) -> None:
    """Copy another adapter's files over ``dst`` (new inodes, as `cp` of new files does)."""
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        os.remove(os.path.join(dst, file))
        shutil.copy(os.path.join(src, file), os.path.join(dst, file))


def test_files_swapped_after_sizing_fail_that_adapter_only(base, manager, adapters):
    # Issue #9 A: a rank-32 adapter's files copied over a loaded rank-4 adapter's directory.
    small, other, _, big = adapters
    free = list(range(1, NUM_BLOCKS))
    placements = place(manager, [small, other], free)  # sized for the files as they are now
    replace_files(big[2], small[2])
    manager.apply_plan(SLoRAStepPlan(load=placements))  # must not raise: one adapter fails
    report = manager.take_report()
    assert [f[:2] for f in report.failed] == [(small[0], 1)]
    assert "changed on disk" in report.failed[0][2] and small[1] in report.failed[0][2]
    assert small[0] in manager.failed and small[0] not in manager.resident
    # Its tokens run without LoRA (bit-exact base) until the scheduler evicts it; the
    # other adapter in the same plan is served as if nothing happened.
    manager.set_token_mapping([small[0], other[0], 0])
    assert manager.state.token_adapter[:3].tolist()[0] == -1 and manager.state.token_adapter[1] >= 0
    check_all_layers(base, manager, adapters, [other[0], 0, other[0]])
    manager.apply_plan(SLoRAStepPlan(evicted=[small[0]]))
    assert small[0] not in manager.failed


def test_more_pages_than_blocks_fail_that_adapter_only(base, manager, adapters):
    small, other = adapters[0], adapters[1]
    free = list(range(1, NUM_BLOCKS))
    good = place(manager, [other], free)[0]
    too_few = AdapterPlacement(small[0], small[1], small[2], 1, (free[0],))  # files unknown: read as they are
    manager.apply_plan(SLoRAStepPlan(load=[too_few, good]))
    (failed,) = manager.take_report().failed
    assert failed[0] == small[0] and "scheduler sized it for 1" in failed[2]
    assert other[0] in manager.resident


def test_a_slow_read_never_blocks_a_step(base, manager, adapters, monkeypatch):
    # Issue #9 item 1: a step loads only what is already read; a read in flight for a
    # queued request must not slow the steps of running ones.
    slow, ready = adapters[3], adapters[0]
    release = threading.Event()
    pack = host_cache_module.pack_adapter

    def slow_pack(spec, *args, **kwargs):
        if spec.path == slow[2]:
            release.wait(10)
        return pack(spec, *args, **kwargs)

    monkeypatch.setattr(host_cache_module, "pack_adapter", slow_pack)
    blocked_gets = []
    get = manager.host_cache.get

    def watched_get(name, path, version, files=None):
        if files is not None and (path, files) in manager.host_cache._warming:
            blocked_gets.append(name)
        return get(name, path, version, files)

    monkeypatch.setattr(manager.host_cache, "get", watched_get)
    manager.apply_plan(SLoRAStepPlan(warm=[source(ready)]))
    manager.host_cache.wait_warm()
    assert manager.take_report().ready == [(ready[0], 1)]
    manager.apply_plan(SLoRAStepPlan(warm=[source(slow)]))  # the read starts and hangs
    free = list(range(1, NUM_BLOCKS))
    started = time.perf_counter()
    manager.apply_plan(SLoRAStepPlan(load=place(manager, [ready], free)))
    check_all_layers(base, manager, adapters, [ready[0], 0])
    elapsed = time.perf_counter() - started
    assert elapsed < 5, f"a step waited {elapsed:.1f} s for a read it did not need"
    assert manager.take_report().ready == [] and not blocked_gets
    release.set()
    manager.host_cache.wait_warm()
    assert manager.take_report().ready == [(slow[0], 1)]


def test_served_from_memory_after_the_files_are_gone(base, manager, adapters, monkeypatch):
    # Issue #9 item 3: a cached adapter needs no file; a hit costs no stat.
    adapter = adapters[1]
    manager.apply_plan(SLoRAStepPlan(warm=[source(adapter)]))
    manager.host_cache.wait_warm()
    free = list(range(1, NUM_BLOCKS))
    placement = place(manager, [adapter], free)[0]
    shutil.rmtree(adapter[2])
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: stats.append(a) or real_stat(*a, **k))
    manager.apply_plan(SLoRAStepPlan(load=[placement]))
    monkeypatch.undo()
    assert not stats and not manager.take_report().failed and adapter[0] in manager.resident


def test_dropped_copies_are_reported(base, adapters):
    # The scheduler must learn when a worker no longer holds a read adapter.
    first = PagedAdapterManager(base, torch.float32, "cpu", 64 << 20)
    first.attach_pool(make_pools(), PAGE_ELEMS)
    size = first.host_cache.get(adapters[0][1], adapters[0][2], 1).nbytes
    manager = PagedAdapterManager(base, torch.float32, "cpu", 1)
    manager.attach_pool(make_pools(), PAGE_ELEMS)
    manager.host_cache.capacity_bytes = size  # room for the first adapter only
    for adapter in adapters[:2]:
        manager.apply_plan(SLoRAStepPlan(warm=[source(adapter)]))
        manager.host_cache.wait_warm()
    report = manager.take_report()
    assert report.dropped == [(adapters[0][0], 1)]
    assert report.host_cache["entries"] == len(manager.host_cache) <= 1
    assert len(report.disk_read_seconds) == 2


def test_unload_drops_every_host_copy(base, manager, adapters):
    # Issue #9 item 5 (worker side): remove_lora leaves nothing of the adapter behind.
    for adapter in adapters:
        assert manager.add_adapter(*adapter)
        manager.apply_plan(SLoRAStepPlan(warm=[source(adapter)]))
    manager.host_cache.wait_warm()
    manager.take_report()
    assert len(manager.host_cache) == len(adapters)
    for adapter in adapters:
        assert manager.remove_adapter(adapter[0])
    assert len(manager.host_cache) == 0 and manager.host_cache.nbytes == 0
    assert not manager.known and not manager._key_owners
    assert not manager.remove_adapter(adapters[0][0])  # unknown now
