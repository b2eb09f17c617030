"""The vLLM linear layers vllm-slora wraps, and which adapter slices each carries."""

from __future__ import annotations

from vllm_slora.adapters.modules import PACKED_MODULES, SLICE_INDEX

# vLLM module name -> its slices' projections, in SLICE_ORDER (q,k,v | o | gate,up | down).
PAGED_MODULES: dict[str, tuple[str, ...]] = dict(PACKED_MODULES)

# vLLM module name -> [start, stop) of its slices in SLICE_ORDER; the slices of one
# module are always adjacent, so per-adapter [layers, 7] tables slice cleanly.
SLICE_RANGE: dict[str, tuple[int, int]] = {
    name: (SLICE_INDEX[slices[0]], SLICE_INDEX[slices[-1]] + 1) for name, slices in PAGED_MODULES.items()
}
