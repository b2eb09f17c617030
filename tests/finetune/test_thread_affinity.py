"""Idle training steps unpin the OpenMP threads vLLM pinned, and pin them back
(vllm_slora/finetune/thread_affinity.py). Runs in a child process: it pins its own threads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import os, threading
from vllm_slora.finetune.thread_affinity import PinnedThreads

done = threading.Event()
free = threading.Thread(target=done.wait)  # made before any pinning: it may run anywhere, left alone
free.start()
cores = sorted(os.sched_getaffinity(0))[:2]
os.sched_setaffinity(0, {cores[0]})  # as vLLM pins its OpenMP threads, one core each
ready, worker_ids = threading.Event(), []

def worker():
    os.sched_setaffinity(0, {cores[1]})
    worker_ids.append(threading.get_native_id())
    ready.set()
    done.wait()

pinned = threading.Thread(target=worker)
pinned.start()
ready.wait()
main, other = threading.get_native_id(), worker_ids[0]
threads = PinnedThreads()
assert threads.pinned == {main: {cores[0]}, other: {cores[1]}}, threads.pinned
assert threads.active and threads.cores == set(cores)
with threads.unpinned():
    assert os.sched_getaffinity(main) == set(cores) == os.sched_getaffinity(other)
    assert set(cores) <= os.sched_getaffinity(free.native_id)  # never pinned, never touched
assert (os.sched_getaffinity(main), os.sched_getaffinity(other)) == ({cores[0]}, {cores[1]})
try:
    with threads.unpinned():
        raise KeyError("a failing unit")
except KeyError:
    pass
assert (os.sched_getaffinity(main), os.sched_getaffinity(other)) == ({cores[0]}, {cores[1]})  # pinned again

os.sched_setaffinity(0, {cores[0]})
os.sched_setaffinity(other, {cores[0]})
single = PinnedThreads()
assert not single.active  # all on one core: nothing to unpin
with single.unpinned():
    assert os.sched_getaffinity(main) == {cores[0]}
done.set()
pinned.join()
free.join()
print("ok")
'''


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores")
def test_pinned_threads_run_unpinned_inside_and_pinned_again_after():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
