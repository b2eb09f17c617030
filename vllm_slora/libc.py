"""The C library, loaded once, for the few glibc calls CPU workers make on host memory
(mallopt / malloc_trim for training's allocations, madvise for lent pool pages)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The process's C library, or None where it cannot be loaded (callers then skip the call)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
