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
everywhere = os.sched_getaffinity(free.native_id)
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
assert threads.active and threads.cores == set(cores) and threads.home == {cores[0]}
later = threading.Thread(target=done.wait)  # started after: inherits the main thread's core
later.start()
assert os.sched_getaffinity(later.native_id) == {cores[0]}
inside = []
with threads.unpinned():
    assert os.sched_getaffinity(main) == set(cores) == os.sched_getaffinity(other)
    assert os.sched_getaffinity(later.native_id) == set(cores)  # listed at the switch, not at PinnedThreads()
    assert os.sched_getaffinity(free.native_id) == everywhere  # never pinned, never touched
    inside.append(threading.Thread(target=done.wait))  # started while unpinned: all the cores
    inside[0].start()
    assert os.sched_getaffinity(inside[0].native_id) == set(cores)
assert (os.sched_getaffinity(main), os.sched_getaffinity(other)) == ({cores[0]}, {cores[1]})
assert os.sched_getaffinity(later.native_id) == {cores[0]}
assert os.sched_getaffinity(inside[0].native_id) == {cores[0]}  # what vLLM's pinning would have given it
assert os.sched_getaffinity(free.native_id) == everywhere
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
for t in (pinned, free, later, *inside):
    t.join()
print("ok")
'''


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores")
def test_pinned_threads_run_unpinned_inside_and_pinned_again_after():
    """Threads pinned before PinnedThreads() and after it are unpinned inside; all are pinned
    again after (also after an exception), a thread started inside gets the caller's core, and
    a thread never pinned keeps its affinity."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
