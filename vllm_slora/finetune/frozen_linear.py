"""Products with the frozen base weights: oneDNN's matmul on CPU, autograd for the input only.

Training multiplies by every base weight twice: ``y = x @ W^T`` forward and
``dL/dx = dL/dy @ W`` backward (no weight gradient: the base is frozen). On CPU, torch's
`F.linear` / `torch.mm` call MKL's sgemm, which on this machine (AMD EPYC with AVX-512;
MKL is known to take slower paths on CPUs that are not Intel's) ran at half the speed of
oneDNN's matmul on the very same dense tensors. 256 rows, the default model's shapes, 2
threads, ms per product (`F.linear` / oneDNN; ``dL/dy @ W`` alike):

    qkv 576 -> 960   1.37 / 0.65     gate_up 576 -> 3072   4.41 / 2.07
    down 1536 -> 576 2.27 / 1.10     LM head 576 -> 49152  94.7 / ~46

vLLM's CPU backend runs its own linears through oneDNN for that reason
(`dispatch_cpu_unquantized_gemm`), from a packed copy of each weight made for x @ W^T.
Training cannot use that copy for the backward (the other operand order) and must not
copy the base weights, so it calls oneDNN's matmul on the dense tensors through
`torch.ops.mkldnn._linear_pointwise` (the op torch's inductor emits for CPU linears; it
takes a plain dense weight, no prepacking), in both directions: the backward product is
a linear by the transposed view ``W^T`` (oneDNN reads the strides, nothing is copied).
The results equal `F.linear`'s to fp32 rounding (tests/finetune/test_frozen_linear.py).
Elsewhere (CUDA, a dtype oneDNN does not take, a torch without the op) and with
``VLLM_SLORA_ONEDNN_TRAINING=0`` (for A/B measurements), `F.linear`.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

ONEDNN_ENV = "VLLM_SLORA_ONEDNN_TRAINING"
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache  # asked on every product (hundreds a pass); fixed for the process
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and weight.dtype == x.dtype
            and os.environ.get(ONEDNN_ENV, "1") != "0" and onednn_available())


def linear_nt(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] (any strides: a transposed view is read as it lies)
) -> torch.Tensor:  # [M, N] = x @ weight^T, no autograd
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], (x.shape, weight.shape)
    if _use_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [], "")
    return F.linear(x, weight)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)  # the engine's own tensor: saved, not copied
        return linear_nt(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = linear_nt(grad, weight.t()) if ctx.needs_input_grad[0] else None  # dL/dy @ W
        return grad_x, None


def frozen_linear(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K], frozen (no gradient is computed for it)
) -> torch.Tensor:  # [M, N] = x @ weight^T, differentiable in x
    assert not weight.requires_grad, "base weights are frozen: no gradient is computed for them"
    return _FrozenLinear.apply(x, weight)
