"""frozen_linear / linear_nt (oneDNN on CPU) against torch's own F.linear and its autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_slora.finetune import frozen_linear as fl

pytestmark = pytest.mark.skipif(not fl.onednn_available(), reason="this torch has no oneDNN linear op")


def _inputs(rows: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(rows, k, generator=g)
    return x, weight


@pytest.mark.parametrize("rows,n,k", [(256, 960, 576), (7, 3072, 576), (64, 576, 1536), (3, 1000, 64)])
def test_forward_and_input_gradient_equal_f_linear(rows, n, k):
    x, weight = _inputs(rows, n, k)
    grad_out = torch.randn(rows, n, generator=torch.Generator().manual_seed(1))
    x1 = x.clone().requires_grad_(True)
    y1 = fl.frozen_linear(x1, weight)
    y1.backward(grad_out)
    x2 = x.clone().requires_grad_(True)
    y2 = F.linear(x2, weight)
    y2.backward(grad_out)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert weight.grad is None


def test_strided_operands_are_read_as_they_lie():
    """A transposed weight view (the backward's dL/dy @ W), a row slice of a bigger weight
    (an LM head's vocabulary slice) and a column slice of the input (a slice of logits)."""
    x, weight = _inputs(32, 640, 96)
    torch.testing.assert_close(fl.linear_nt(x[:, :96], weight[100:300]), x @ weight[100:300].t(), rtol=1e-5, atol=1e-5)
    probs = torch.randn(32, 1000)[:, 200:840]  # [32, 640], not contiguous
    torch.testing.assert_close(fl.linear_nt(probs, weight.t()), probs @ weight, rtol=1e-5, atol=1e-5)


def test_the_onednn_op_is_what_runs_on_cpu_and_the_switch_turns_it_off(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __getattr__(self, name):
            if name == "_linear_pointwise":
                return lambda *a: calls.append(a[0].shape) or real(*a)
            return getattr(torch.ops.mkldnn, name)

    x, weight = _inputs(8, 16, 4)
    monkeypatch.setattr(fl.torch.ops, "mkldnn", Spy(), raising=False)
    fl.linear_nt(x, weight)
    assert calls == [torch.Size([8, 4])]
    monkeypatch.setenv(fl.ONEDNN_ENV, "0")
    fl.linear_nt(x, weight)
    fl.linear_nt(x.double(), weight.double())  # a dtype oneDNN is not given
    assert len(calls) == 1


def test_a_weight_that_wants_a_gradient_is_refused():
    x, weight = _inputs(4, 8, 4)
    with pytest.raises(AssertionError, match="frozen"):
        fl.frozen_linear(x, weight.requires_grad_(True))
