"""The LoRA compute backends behind the paged layers: native CPU, plain torch, Triton.

All three take the same static tables (step_metadata.py) and the same op semantics
(kernels/ops.py). Which one a worker uses is decided once at start-up
(`pick_backend`), never per step:

* ``native``: the C++/OpenMP kernel (kernels/csrc), one call per layer and projection
  for all adapters of the step; the CPU default.
* ``torch``: kernels/torch_ops.py, the reference and the fallback where the native
  kernel was not built; groups tokens and views pool rows on the host (CPU only).
* ``triton``: the Triton kernels on CUDA; grids depend on static bounds only and no
  host value is read, so the calls are capture-safe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import (
    HAS_TRITON,
    PreparedRuns,
    cpu_native,
    expand_torch,
    paged_lora_expand,
    paged_lora_shrink,
    prepare_runs,
    row_runs,
    shrink_torch,
)
from .step_metadata import StepMetadata

BACKENDS = ("native", "torch", "triton")


class NativeBackend:
    name = "native"
    cuda_safe = False

    def shrink(self, md: StepMetadata, key: tuple, x, pool, offsets, ranks, tokens, buf) -> None:
        cpu_native.shrink(x, pool, offsets, ranks, tokens, buf)

    def expand(self, md: StepMetadata, key: tuple, buf, pool, offsets, ranks, scalings, tokens, y,
               out_sizes: Sequence[int]) -> None:
        cpu_native.expand(buf, pool, offsets, ranks, scalings, tokens, y, out_sizes)


class TorchBackend:
    """Per-adapter torch matmuls over zero-copy pool views, cached per slot."""

    name = "torch"
    cuda_safe = False

    def _runs(self, md: StepMetadata, key: tuple, plan, pool, offsets, ranks, row_len, transpose: bool):
        def compute(slot: int) -> list:
            runs = row_runs(offsets[slot : slot + 1], ranks[slot : slot + 1], row_len)
            return prepare_runs(pool, runs, row_len, transpose).get(0, [])

        return PreparedRuns(md.slot_runs(key, [slot for slot, _, _ in plan.spans], compute))

    def shrink(self, md: StepMetadata, key: tuple, x, pool, offsets, ranks, tokens, buf) -> None:
        plan = md.token_plan(x.shape[0])
        runs = self._runs(md, key, plan, pool, offsets, ranks, x.shape[1], True)
        shrink_torch(x, pool, offsets, ranks, tokens, buf, plan=plan, runs=runs)

    def expand(self, md: StepMetadata, key: tuple, buf, pool, offsets, ranks, scalings, tokens, y,
               out_sizes: Sequence[int]) -> None:
        plan = md.token_plan(y.shape[0])
        runs = self._runs(md, key, plan, pool, offsets, ranks, list(out_sizes), False)
        expand_torch(buf, pool, offsets, ranks, scalings, tokens, y, out_sizes, plan=plan, runs=runs)


class TritonBackend:
    name = "triton"
    cuda_safe = True

    def shrink(self, md: StepMetadata, key: tuple, x, pool, offsets, ranks, tokens, buf) -> None:
        paged_lora_shrink(x, pool, offsets, ranks, tokens, buf, md.meta)

    def expand(self, md: StepMetadata, key: tuple, buf, pool, offsets, ranks, scalings, tokens, y,
               out_sizes: Sequence[int]) -> None:
        paged_lora_expand(buf, pool, offsets, ranks, scalings, tokens, y, out_sizes, md.meta)


def pick_backend(requested: str, device: torch.device | str):
    """The backend for ``kernel_backend`` on this device; ValueError naming what is missing."""
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        if on_cuda:
            requested = "triton" if HAS_TRITON else "torch"
        else:
            requested = "native" if cpu_native.available() else "torch"
    if requested == "triton" and not (on_cuda and HAS_TRITON):
        raise ValueError(
            "slora config key 'kernel_backend' is 'triton', but this worker has "
            f"{'no Triton' if on_cuda else 'no CUDA device'}; use 'auto' or 'torch'"
        )
    if requested == "native":
        if on_cuda:
            raise ValueError("slora config key 'kernel_backend' is 'native' (a CPU kernel) on a CUDA worker; "
                             "use 'auto' or 'triton'")
        if not cpu_native.available():
            raise ValueError(f"slora config key 'kernel_backend' is 'native', but {cpu_native.unavailable_reason()}")
    if requested == "torch" and on_cuda:
        raise ValueError("slora config key 'kernel_backend' is 'torch' on a CUDA worker: the torch path syncs "
                         "with the host every layer and cannot be captured in CUDA graphs; use 'auto' or 'triton'")
    return {"native": NativeBackend, "torch": TorchBackend, "triton": TritonBackend}[requested]()
