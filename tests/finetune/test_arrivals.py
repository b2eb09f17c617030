"""Requests waiting in the EngineCore input queue, counted for the training worker (finetune/arrivals.py)."""

from __future__ import annotations

import queue
import threading

from vllm_slora.finetune.arrivals import ArrivalCounter, count_arrivals


def is_add(item) -> bool:
    return item[0] == "ADD"


def test_counts_new_requests_in_and_out_and_nothing_else():
    q = queue.Queue()
    q.put_nowait(("ADD", "before"))  # queued before counting: never counted
    counter = ArrivalCounter.create()
    count_arrivals(q, counter, is_add)
    reader = ArrivalCounter.attach(counter.path)  # the worker's view (another process in an engine)
    q.put_nowait(("UTILITY", "poll"))
    assert reader.waiting() == 0
    q.put_nowait(("ADD", "r1"))
    q.put(("ADD", "r2"))
    assert reader.waiting() == 2
    kinds = [q.get_nowait() for _ in range(3)]  # "before", the poll, r1
    assert [tuple(k) for k in kinds] == [("ADD", "before"), ("UTILITY", "poll"), ("ADD", "r1")]
    assert reader.waiting() == 1
    request_type, request = q.get(block=False)  # unpacks like the engine's items
    assert (request_type, request) == ("ADD", "r2") and reader.waiting() == 0


def test_a_request_taken_at_once_is_never_left_counted():
    """The count goes up before the item is queued: a get racing the put cannot leave it at 1."""
    q = queue.Queue()
    counter = ArrivalCounter.create()
    count_arrivals(q, counter, is_add)
    done = threading.Event()

    def consume():
        for _ in range(2000):
            q.get()
        done.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    for i in range(2000):
        q.put_nowait(("ADD", i))
    consumer.join(timeout=30)
    assert done.is_set() and counter.waiting() == 0
