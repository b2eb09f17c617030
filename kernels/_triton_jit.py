"""`triton.jit` applied at first launch rather than at import.

Triton decides at decoration time whether a kernel runs compiled or in the interpreter
(TRITON_INTERPRET=1). Decorating lazily, keyed by that flag, lets the CPU tests turn the
interpreter on after `kernels` was imported elsewhere in the same process.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton

_JITTED: dict[tuple[Callable, bool], object] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def jitted(kernel: Callable):
    """The triton-jitted (or interpreted) form of the plain function ``kernel``."""
    key = (kernel, interpreting())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(kernel)
    return _JITTED[key]


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` should take fp32 operands at full (IEEE) precision.

    True for fp32 data (the default tf32 would keep ~3 significant digits) and for bf16
    under the interpreter, whose numpy-backed dot mishandles bf16 operands.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())
