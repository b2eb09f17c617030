"""Admission under pool pressure (pool/admission.py), on a real vLLM BlockPool.

The policy decides from block counts; these tests drive it the way the scheduler does
(`SLoRASchedulerMixin._slora_admit`): a request's demand against the pool's free blocks,
pins through `AdapterResidency`, and the gate's ageing and reservation.
"""

from __future__ import annotations

import pytest

from vllm_slora.pool.admission import AdmissionGate, Demand, kv_blocks_for, never_fits
from vllm_slora.pool.residency import AdapterResidency, Residency
from vllm_slora.step_plan import AdapterPlacement


@pytest.fixture
def pool():
    from vllm.v1.core.block_pool import BlockPool

    # The pool: 16 blocks, 15 usable (block 0 is vLLM's null block).
    return BlockPool(num_gpu_blocks=16, enable_caching=True, hash_block_size=16)


def describe(lora_id):
    return lambda block_ids: AdapterPlacement(lora_id, f"a{lora_id}", f"/p/{lora_id}", 1, block_ids)


def test_kv_blocks_count_the_next_token():
    assert kv_blocks_for(350, 128) == 3
    assert kv_blocks_for(127, 128) == 1
    assert kv_blocks_for(128, 128) == 2  # the 129th token needs a second block
    assert kv_blocks_for(0, 16) == 1


def test_never_fits_names_both_counts_and_the_pool():
    # Issue #9 B: rank-64 adapter = 14 blocks, ~350-token prompt = 3 blocks, 15 usable.
    problem = never_fits(14, 350, 128, 15)
    assert problem is not None
    for needle in ("14 pool blocks", "350 tokens", "3 KV blocks", "17", "whole pool has 15"):
        assert needle in problem, problem
    assert never_fits(14, 100, 128, 15) is None  # 14 + 1 fits exactly
    assert never_fits(12, 350, 128, 15) is None


def test_adapter_is_pinned_only_when_its_requests_kv_fits_too(pool):
    """Rule 2: no load/evict loop. The old rule pinned whenever the adapter alone fit."""
    res = AdapterResidency(pool)
    kv = pool.get_new_blocks(3)  # running requests' KV: 12 free
    big = Demand(adapter=7, adapter_blocks=10, kv_blocks=3)
    assert pool.get_num_free_blocks() >= big.adapter_blocks  # the adapter alone would fit...
    assert not big.fits(pool.get_num_free_blocks())  # ...but not beside its KV: wait, unloaded
    assert res.state(7) is Residency.ABSENT and res.stats().loads == 0
    pool.free_blocks(kv)
    assert big.fits(pool.get_num_free_blocks())
    res.pin(7, big.adapter_blocks, describe(7))
    assert pool.get_new_blocks(big.kv_blocks)  # vLLM's allocation for the prompt succeeds


def test_demand_counts_a_shared_adapter_once():
    holder = Demand(adapter=1, adapter_blocks=8, kv_blocks=2)
    same = Demand(adapter=1, adapter_blocks=8, kv_blocks=1)
    other = Demand(adapter=2, adapter_blocks=1, kv_blocks=1)
    no_lora = Demand(adapter=None, adapter_blocks=0, kv_blocks=1)
    assert same.fits(11, beside=holder)  # 8 + 1 + 2
    assert not other.fits(11, beside=holder)  # 1 + 1 + 8 + 2 = 12
    assert other.fits(12, beside=holder)
    assert no_lora.fits(11, beside=holder) and not no_lora.fits(10, beside=holder)


class Req:
    def __init__(self, request_id, arrival):
        self.request_id, self.arrival, self.waiting = request_id, arrival, True

    @property
    def order(self):
        return (self.arrival, self.request_id)


def waiting(req):
    return req.waiting


def test_gate_reserves_for_the_oldest_request_refused_long_enough():
    gate = AdmissionGate(max_blocked_steps=3)
    old, young = Req("old", 1.0), Req("young", 2.0)
    for _ in range(2):
        gate.blocked(young.request_id, young.order, young)
        gate.blocked(old.request_id, old.order, old)
    assert gate.holder(waiting) is None and gate.blocked_steps("old") == 2
    gate.blocked(young.request_id, young.order, young)  # young crosses first...
    gate.blocked(old.request_id, old.order, old)
    assert gate.holder(waiting) == ("old", old)  # ...but the older one is served first
    gate.blocked(young.request_id, young.order, young)
    assert gate.holder(waiting) == ("old", old)  # held until it leaves the queue
    gate.admitted("old")
    assert gate.holder(waiting) == ("old", old)  # passed admission, not yet running
    old.waiting = False
    assert gate.holder(waiting) == ("young", young)
    gate.forget("young")
    assert gate.holder(waiting) is None


def test_a_refused_request_never_holds_the_reservation():
    gate = AdmissionGate(max_blocked_steps=1)
    doomed = Req("doomed", 0.0)
    gate.blocked(doomed.request_id, doomed.order, doomed)
    assert gate.holder(waiting) == ("doomed", doomed)
    gate.forget("doomed")  # what the scheduler does when it refuses a request
    assert gate.holder(waiting) is None
    aborted = Req("aborted", 1.0)
    gate.blocked(aborted.request_id, aborted.order, aborted)
    aborted.waiting = False  # finished / aborted without the gate being told
    assert gate.holder(waiting) is None and gate.blocked_steps("aborted") == 0


def test_gate_forgets_requests_that_left_without_being_told():
    gate = AdmissionGate(max_blocked_steps=10**6)
    gone = [Req(f"r{i}", float(i)) for i in range(300)]
    for r in gone:
        gate.blocked(r.request_id, r.order, r)
        r.waiting = False
    gate.holder(waiting)  # prunes once the table is large
    assert all(gate.blocked_steps(r.request_id) == 0 for r in gone)


def simulate(pool, *, gate, steps, big_at=0):
    """A scheduler loop in miniature on a real pool.

    A stream of small requests (own adapter of 1 block each, KV 1 block, running 3 steps)
    arrives 4 per step; one big request (adapter 10 blocks + KV 2 blocks) arrives at
    `big_at`. Waiting requests are considered oldest first, as vLLM's FCFS queue does
    with skipped requests put back in front. Returns the step the big one was admitted
    at, or None.
    """
    res = AdapterResidency(pool)
    running: list[tuple[int, list, int]] = []  # (finish step, kv blocks, lora id)
    queue: list[tuple[Req, Demand]] = []
    next_small = 100
    admitted_at = None
    for step in range(steps):
        for _ in range(4):
            queue.append((Req(f"s{next_small}", float(step)), Demand(next_small, 1, 1)))
            next_small += 1
        if step == big_at:
            queue.append((Req("big", float(step) - 0.5), Demand(1, 10, 2)))
            queue.sort(key=lambda item: item[0].order)
        for finish, kv, lora in [r for r in running if r[0] == step]:
            pool.free_blocks(kv)
            res.unpin(lora)
            running.remove((finish, kv, lora))
        holder = gate.holder(waiting)
        for req, demand in list(queue):
            beside = None
            if holder is not None and holder[0] != req.request_id:
                beside = next(d for r, d in queue if r.request_id == holder[0])
            if not demand.fits(pool.get_num_free_blocks(), beside):
                gate.blocked(req.request_id, req.order, req)
                continue
            assert res.pin(demand.adapter, demand.adapter_blocks, describe(demand.adapter))
            running.append((step + 3, pool.get_new_blocks(demand.kv_blocks), demand.adapter))
            gate.admitted(req.request_id)
            req.waiting = False
            queue.remove((req, demand))
            if req.request_id == "big":
                admitted_at = step
            holder = gate.holder(waiting)
    return admitted_at


def test_big_adapter_behind_a_stream_of_small_ones_waits_a_bounded_time(pool):
    """Item 6: without ageing the big request starves; with it, it is admitted within
    the ageing bound plus the time the running requests take to finish."""
    starved = simulate(pool, gate=AdmissionGate(max_blocked_steps=10**9), steps=200, big_at=5)
    assert starved is None, "the stream should keep the big request out without a reservation"

    from vllm.v1.core.block_pool import BlockPool

    fresh = BlockPool(num_gpu_blocks=16, enable_caching=True, hash_block_size=16)
    admitted = simulate(fresh, gate=AdmissionGate(max_blocked_steps=8), steps=200, big_at=5)
    assert admitted is not None and admitted - 5 <= 8 + 3 + 1, admitted
