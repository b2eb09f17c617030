"""Requests that arrived while a training step runs, visible to the worker between units.

A co-served engine step with training ends only when its units do. A request that
arrives meanwhile sits in the EngineCore's input queue (its input thread keeps
receiving) until the step ends, so an idle step of training delays its first token by
up to the whole step. The worker cannot see that queue, so the EngineCore counts, in a
small shared file, the new requests put into the queue and those taken out; the worker
checks the difference before each unit and ends the step as soon as one is waiting.
That lets idle steps be long (few step boundaries: training at full speed) while an
arrival waits for one unit at most.

Single writer per counter: the input thread puts, the EngineCore's main thread gets.
Readers may see a count a moment late; that costs at most one more unit.
"""

from __future__ import annotations

import atexit
import mmap
import os
import struct
import tempfile

_LAYOUT = struct.Struct("<qq")  # requests put into the input queue, requests taken out


class ArrivalCounter:
    def __init__(self, path: str, writable: bool) -> None:
        self.path = path
        with open(path, "r+b" if writable else "rb") as f:
            self._map = mmap.mmap(f.fileno(), _LAYOUT.size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        self._put = self._taken = 0

    @classmethod
    def create(cls) -> ArrivalCounter:
        """A new counter file (in /dev/shm where there is one), removed when this process exits."""
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="vllm-slora-arrivals-", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(_LAYOUT.size))
        atexit.register(_remove, path)
        return cls(path, writable=True)

    @classmethod
    def attach(cls, path: str) -> ArrivalCounter:
        return cls(path, writable=False)

    def put(self) -> None:
        self._put += 1
        struct.pack_into("<q", self._map, 0, self._put)

    def taken(self) -> None:
        self._taken += 1
        struct.pack_into("<q", self._map, 8, self._taken)

    def waiting(self) -> int:
        """New requests in the input queue now (0 when none)."""
        put, taken = _LAYOUT.unpack_from(self._map, 0)
        return put - taken


class _Counted(tuple):
    """An input-queue item counted on its way in (so only those are counted out)."""


def count_arrivals(input_queue, counter: ArrivalCounter, is_new_request) -> None:
    """Make `input_queue` (a queue.Queue of EngineCore input tuples) count new requests in and out.

    The instance's own put / get are wrapped (queue.Queue's put_nowait / get_nowait call
    them). A request is counted before it is queued, so the count never misses one that
    is taken at once; items queued before this ran are not counted either way.
    """
    put, get = input_queue.put, input_queue.get

    def counted_put(item, *args, **kwargs):
        if isinstance(item, tuple) and is_new_request(item):
            counter.put()
            item = _Counted(item)
        return put(item, *args, **kwargs)

    def counted_get(*args, **kwargs):
        item = get(*args, **kwargs)
        if isinstance(item, _Counted):
            counter.taken()
        return item

    input_queue.put, input_queue.get = counted_put, counted_get


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
