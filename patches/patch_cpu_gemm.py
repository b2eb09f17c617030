"""Keep the dense linear weights on vLLM's CPU backend, for training on the engine's weights.

Why: after loading, `UnquantizedLinearMethod.process_weights_after_loading`
(vllm/model_executor/layers/linear.py:207-216) calls
`dispatch_cpu_unquantized_gemm(layer, remove_weight=True)` (vllm/model_executor/layers/utils.py:470):
the weight is repacked for the CPU GEMM kernel (oneDNN handle, sgl-kernel packed weight or
zentorch), and `layer.weight` is replaced by an empty (0,) tensor. The packed form is opaque,
so the training forward (vllm_slora/finetune/forward.py), which reads the dense
qkv / o / gate_up / down weights by reference (base_weights_from_vllm), has nothing to read.
GPU backends keep the dense weight; the embedding and lm_head already keep theirs on CPU
(vocab_parallel_embedding.py:71, remove_weight=False).

Subclassing does not reach it: every linear layer builds its own `UnquantizedLinearMethod`
inside vLLM's constructors (no config field selects the class), and the model loader calls
`process_weights_after_loading` on each.

How: wrap `dispatch_cpu_unquantized_gemm` so that it passes `remove_weight=False` while
`keep_dense_linear_weights()` is active, and is the original everywhere else. The context is
entered only by `SLoRAWorkerMixin.load_model` of engines with `slora.finetune=true`, and the
patch is applied only by that worker (`apply_patches("slora_finetune")`), so other engines,
in the same process or not, are untouched. The serving path is unchanged (it still runs the
packed GEMM); the kept weight is only read by the training forward.

Cost (why it is opt-in): a second copy of every dense linear weight, next to the packed one
the kernels use: 4 B x sum of the qkv/o/gate_up/down weight elements in fp32 (about 405 MiB
for the 135M default model, 1.1 MiB for the tests' tiny model); the embedding / lm_head
are not duplicated.

Removal: drop when vLLM's CPU backend can keep (or hand back) the dense weight itself,
e.g. an option for `remove_weight`, or when training reads the packed weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_ORIGINAL_ATTR = "_vllm_slora_original"
_KEEP = ContextVar("vllm_slora_keep_dense_linear_weights", default=False)


@contextmanager
def keep_dense_linear_weights(enabled: bool = True) -> Iterator[None]:
    """While active (and the patch applied), CPU linear layers keep their dense weight."""
    token = _KEEP.set(enabled)
    try:
        yield
    finally:
        _KEEP.reset(token)


def apply() -> None:
    from vllm_slora.compat import cpu_gemm_utils

    utils = cpu_gemm_utils()
    current = utils.dispatch_cpu_unquantized_gemm
    if hasattr(current, _ORIGINAL_ATTR):
        return

    def dispatch_cpu_unquantized_gemm(layer, remove_weight: bool) -> None:
        # linear.py imports the function from the module at call time, so this wrapper
        # is what it calls.
        return current(layer, remove_weight=remove_weight and not _KEEP.get())

    setattr(dispatch_cpu_unquantized_gemm, _ORIGINAL_ATTR, current)
    utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm
