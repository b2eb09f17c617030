"""The native C++/OpenMP CPU kernel for the paged LoRA ops (``torch.ops.slora_cpu.*``).

Same semantics as kernels/ops.py (``a = token_adapter[t]``, -1 = no adapter)::

    shrink: out[s, t, :r] = x[t] @ A_s(a)^T ; every other element of out = 0
    expand: y[t, slice s] += scalings[a, s] * buf[s, t, :r] @ B_s(a)^T
            (tokens with a == -1 and slices with r == 0: y untouched, bit-exact)

The kernel (kernels/csrc/paged_lora_cpu.cpp) is the optional extension
``vllm_slora._paged_lora_cpu``, built by the package's install when a C++ compiler is
there. Without it this module still imports: `available()` is False and
`unavailable_reason()` says why, and callers keep using the torch path.

ISA: AVX-512, AVX2 or scalar, the widest the CPU supports; ``SLORA_CPU_ISA`` (read on
every call) forces a narrower one. Threads: torch's intra-op pool (``torch.set_num_threads``).

Imports torch only. This module can be imported twice in one process (as
``kernels.cpu_native`` and ``vllm_slora.kernels.cpu_native``); fake impls are registered
once.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch

NAMESPACE = "slora_cpu"
ISAS = ("scalar", "avx2", "avx512")  # narrowest to widest

_REASON: str | None = None  # why the extension is unavailable; None when loaded


def _load() -> None:
    global _REASON
    if hasattr(torch.ops, NAMESPACE) and hasattr(getattr(torch.ops, NAMESPACE), "shrink"):
        return  # already loaded (by the other import name, or by hand)
    try:
        importlib.import_module("vllm_slora._paged_lora_cpu")
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name in ("vllm_slora", "vllm_slora._paged_lora_cpu")
        _REASON = (
            "the native CPU kernel was not built (no C++ compiler or torch at install time, or its build failed; "
            "reinstall with `pip install --no-deps --no-build-isolation -e .` to see why); using the torch path"
            if missing
            else f"the native CPU kernel failed to load ({exc}); using the torch path"
        )


_load()


def available() -> bool:
    """True when ``torch.ops.slora_cpu.{shrink,expand}`` are registered."""
    return _REASON is None


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    return _REASON or ""


def isa() -> str:
    """The path the next call takes: 'avx512', 'avx2' or 'scalar' (SLORA_CPU_ISA applied)."""
    _require()
    return torch.ops.slora_cpu.isa()


def detected_isa() -> str:
    """The widest path this CPU supports."""
    _require()
    return torch.ops.slora_cpu.detected_isa()


def supported_isas() -> list[str]:
    """Every path SLORA_CPU_ISA may select on this CPU, narrowest first."""
    return list(ISAS[: ISAS.index(detected_isa()) + 1])


def _require() -> None:
    if _REASON is not None:
        raise RuntimeError(_REASON)


def _shrink_fake(x, pool, a_row_offsets, ranks, token_adapter, out) -> None:
    return None


def _expand_fake(buf, pool, b_row_offsets, ranks, scalings, token_adapter, y, out_sizes) -> None:
    return None


def _register_fakes() -> None:
    """Fake impls so the ops trace under torch.compile (once per process)."""
    if _REASON is not None:
        return
    for name, fake in (("shrink", _shrink_fake), ("expand", _expand_fake)):
        qualname = f"{NAMESPACE}::{name}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"):
            continue
        try:
            torch.library.register_fake(qualname, fake)
        except RuntimeError as exc:  # registered by the module's other import name
            if "already has" not in str(exc) and "already registered" not in str(exc):
                raise


_register_fakes()

_OPS: tuple | None = None  # (shrink, expand) OpOverloads, looked up once (saves ~1 us a call)


def _ops() -> tuple:
    global _OPS
    if _OPS is None:
        _OPS = (torch.ops.slora_cpu.shrink.default, torch.ops.slora_cpu.expand.default)
    return _OPS


def shrink(
    x: torch.Tensor,  # [T, in_features], fp32/bf16/fp16; unit column stride, any row stride
    pool: torch.Tensor,  # [N] flat contiguous, x.dtype
    a_row_offsets: torch.Tensor,  # int64 [A, S, R] contiguous: pool offset of row j of A_s(a)
    ranks: torch.Tensor,  # int32 [A, S]: rank of A_s(a), 0 = slice absent
    token_adapter: torch.Tensor,  # int32 [T]: adapter row per token, -1 = none
    out: torch.Tensor,  # float32 [S, T, >= R], unit last stride: overwritten
) -> None:
    """out[s, t, :r] = x[t] @ A_s(a)^T, zero elsewhere."""
    _require()
    _ops()[0](x, pool, a_row_offsets, ranks, token_adapter, out)


def expand(
    buf: torch.Tensor,  # float32 [S, T, >= R], unit last stride, any other strides
    pool: torch.Tensor,  # [N] flat contiguous, y.dtype
    b_row_offsets: torch.Tensor,  # int64 [A, S, R] contiguous: pool offset of row j of B_s(a)^T
    ranks: torch.Tensor,  # int32 [A, S]: rank of B_s(a), 0 = slice absent
    scalings: torch.Tensor,  # float32 [A, S]
    token_adapter: torch.Tensor,  # int32 [T]: adapter row per token, -1 = none
    y: torch.Tensor,  # [T, sum(out_sizes)], unit column stride, any row stride: updated in place
    out_sizes: Sequence[int],  # width of every slice of y
) -> None:
    """y[t, slice s] += scalings[a, s] * buf[s, t, :r] @ B_s(a)^T (fp32 accumulation, one rounding)."""
    _require()
    _ops()[1](buf, pool, b_row_offsets, ranks, scalings, token_adapter, y, list(out_sizes))
