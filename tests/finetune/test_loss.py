"""The fused LM head + cross-entropy against torch's own linear + F.cross_entropy autograd."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F

from vllm_slora.finetune import loss as loss_module
from vllm_slora.finetune import memory
from vllm_slora.finetune.loss import lm_head_cross_entropy


def reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float):
    hidden = hidden.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(F.linear(hidden, weight).to(torch.float32), targets, reduction="sum") * scale
    loss.backward()
    return loss.detach(), hidden.grad


@pytest.mark.parametrize("rows,vocab", [(1, 7), (5, 300), (33, 1024)])
@pytest.mark.parametrize("scale", [1.0, 1 / 37])
@pytest.mark.parametrize("chunk_rows", [512, 7])  # one chunk, or several with a ragged last one
def test_loss_and_hidden_gradient_equal_torch_cross_entropy(rows, vocab, scale, chunk_rows, monkeypatch):
    monkeypatch.setattr(loss_module, "LM_HEAD_CHUNK_ROWS", chunk_rows)
    gen = torch.Generator().manual_seed(rows * vocab)
    weight = torch.randn(vocab, 16, generator=gen)
    hidden = torch.randn(rows, 16, generator=gen) * 3  # large logits: the max shift matters
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[0] = vocab - 1  # the last column too
    want_loss, want_grad = reference(hidden, weight, targets, scale)
    ours = hidden.clone().requires_grad_(True)
    loss = lm_head_cross_entropy(ours, weight, targets) * scale
    loss.backward()
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.grad, want_grad, rtol=1e-5, atol=1e-5)  # GEMM blocking differs per chunk


def test_repeated_targets_and_extreme_logits():
    weight = torch.tensor([[100.0, 0.0], [-100.0, 0.0], [0.0, 1.0]])
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 2.0]])
    targets = torch.tensor([1, 1, 2])  # the first two rows: the target's probability underflows
    want_loss, want_grad = reference(hidden, weight, targets, 1.0)
    ours = hidden.clone().requires_grad_(True)
    loss = lm_head_cross_entropy(ours, weight, targets)
    loss.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), want_loss)
    torch.testing.assert_close(ours.grad, want_grad)


def test_bf16_weights_follow_torch_within_bf16_rounding():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(512, 32, generator=gen).to(torch.bfloat16)
    hidden = torch.randn(9, 32, generator=gen).to(torch.bfloat16)
    targets = torch.randint(0, 512, (9,), generator=gen)
    want_loss, want_grad = reference(hidden, weight, targets, 0.5)
    ours = hidden.clone().requires_grad_(True)
    loss = lm_head_cross_entropy(ours, weight, targets) * 0.5
    loss.backward()
    assert loss.dtype == torch.float32 and ours.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours.grad, want_grad, rtol=2e-2, atol=2e-3)


def test_without_gradients_only_the_loss():
    gen = torch.Generator().manual_seed(4)
    weight, hidden = torch.randn(50, 8, generator=gen), torch.randn(4, 8, generator=gen)
    targets = torch.randint(0, 50, (4,), generator=gen)
    with torch.no_grad():
        loss = lm_head_cross_entropy(hidden, weight, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), targets, reduction="sum"))


def test_a_trainable_lm_head_is_refused():
    weight = torch.randn(10, 4, requires_grad=True)
    with pytest.raises(AssertionError, match="LM head is frozen"):
        lm_head_cross_entropy(torch.randn(2, 4), weight, torch.tensor([1, 2]))


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the tensors created under it and still alive (storages, counted once)."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak, self._seen = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                # Views and in-place results share an input's storage: not a new allocation.
                if key not in self._seen and key not in inputs and storage.nbytes():
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", [1, 4])
def test_peak_memory_within_the_loss_unit_share(dtype, chunks, monkeypatch):
    """finetune/memory.py sizes a LOSS unit as LOSS_TENSORS [rows, vocab] fp32 tensors; with rows
    beyond LM_HEAD_CHUNK_ROWS, only one chunk's logits live at a time."""
    rows, vocab, width = 64, 4096, 32
    monkeypatch.setattr(loss_module, "LM_HEAD_CHUNK_ROWS", rows // chunks)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(vocab, width, generator=gen).to(dtype)
    hidden = torch.randn(rows, width, generator=gen).to(dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    counter = LiveBytes()
    with counter:
        lm_head_cross_entropy(hidden, weight, targets).backward()
    logits = rows // chunks * vocab * memory.FP32_BYTES
    assert logits <= counter.peak <= memory.LOSS_TENSORS * logits + 64 * 1024, (counter.peak, logits)
