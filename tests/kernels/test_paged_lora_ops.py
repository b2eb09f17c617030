"""The public paged LoRA ops against the dense oracle.

They run on CUDA (Triton) when a GPU is present, else on CPU (the torch path, which is
the CPU production backend). Axes: adapter popularity x ragged batch sizes, dtypes x
hidden sizes (odd, TP-sliced), ranks 1..128 in one batch, 1-3 slices with absent
slices, tokens without adapter, shuffled page tables (every case), with and without a
prepared PagedLoRAMeta. SLORA_KERNEL_SWEEP=1 crosses all axes (slow).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from kernels import paged_lora_expand, paged_lora_linear, paged_lora_shrink
from tests.kernels.lora_cases import POPULARITIES, assert_close, assert_untouched_rows, make_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SWEEP = os.environ.get("SLORA_KERNEL_SWEEP") == "1"
BATCH_SIZES = [1, 2, 3, 7, 16, 64, 133]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (in_features, out_sizes): odd, Llama-2-7B QKV / gate-up TP-sliced, down_proj at TP=4.
SHAPES = [
    (2049, (2049,)),
    (4096 // 2, (4096 // 2, 4096 // 2, 4096 // 2)),
    (4096, (11008 // 2, 11008 // 2)),
    (11008 // 4, (4096,)),
]


def run_linear(case, use_meta: bool) -> tuple[torch.Tensor, torch.Tensor]:
    meta = case.meta() if use_meta else None
    buf = torch.full((case.num_slices, case.x.shape[0], case.a_row_offsets.shape[2]), 7.0, device=case.x.device)
    y = case.y0.clone()
    paged_lora_shrink(case.x, case.pool, case.a_row_offsets, case.ranks, case.token_adapter, buf, meta)
    paged_lora_expand(
        buf, case.pool, case.b_row_offsets, case.ranks, case.scalings, case.token_adapter, y, case.out_sizes, meta
    )
    return buf, y


def check(case, dtype, use_meta: bool) -> None:
    buf, y = run_linear(case, use_meta)
    assert_close(buf, case.reference_shrink(), torch.float32 if dtype == torch.float32 else torch.float16)
    assert_close(y, case.reference_linear(), dtype)
    assert_untouched_rows(y, case.y0, case.token_adapter)


POPULARITY_BATCH = list(itertools.product(POPULARITIES, BATCH_SIZES))


@pytest.mark.parametrize("popularity,num_tokens", POPULARITY_BATCH)
def test_popularity_and_batch(popularity, num_tokens):
    case = make_case(
        num_tokens=num_tokens, popularity=popularity, in_features=96, out_sizes=(64, 32, 32),
        no_adapter_every=5, shuffle_tokens=num_tokens % 2 == 1, device=DEVICE, seed=num_tokens,
    )  # fmt: skip
    check(case, torch.float32, use_meta=num_tokens % 3 != 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_features,out_sizes", SHAPES, ids=lambda v: str(v))
def test_dtypes_and_model_shapes(dtype, in_features, out_sizes):
    num_tokens = 64 if DEVICE == "cuda" else 16
    case = make_case(
        num_tokens=num_tokens, popularity="zipf", in_features=in_features, out_sizes=out_sizes, dtype=dtype,
        rank_choices=(8, 16, 32, 64), no_adapter_every=7, page_elems=3 * in_features + 5, device=DEVICE,
    )  # fmt: skip
    check(case, dtype, use_meta=True)


@pytest.mark.parametrize("use_meta", [False, True], ids=["no-meta", "meta"])
def test_ranks_1_to_128_in_one_batch(use_meta):
    ranks = (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128)
    case = make_case(
        num_tokens=len(ranks) * 3, popularity="uniform", in_features=257, out_sizes=(129, 40),
        rank_choices=ranks, absent_slices=False, no_adapter_every=4, page_elems=4000, device=DEVICE,
    )  # fmt: skip
    check(case, torch.float32, use_meta)


@pytest.mark.parametrize("num_slices", [1, 2, 3])
@pytest.mark.parametrize("shuffle_tokens", [False, True], ids=["runs", "shuffled"])
def test_slices_and_token_order(num_slices, shuffle_tokens):
    case = make_case(
        num_tokens=40, popularity="uniform", in_features=80, out_sizes=(24, 40, 16)[:num_slices],
        shuffle_tokens=shuffle_tokens, no_adapter_every=3, device=DEVICE,
    )  # fmt: skip
    check(case, torch.float32, use_meta=True)


def test_contiguous_pages_single_run():
    """Rows filling pages exactly: every matrix is one zero-copy view (the fast CPU case)."""
    case = make_case(num_tokens=12, in_features=64, out_sizes=(64,), page_elems=64 * 40, device=DEVICE)
    check(case, torch.float32, use_meta=False)


def test_tokens_without_adapter_keep_exact_bits():
    case = make_case(num_tokens=9, popularity="uniform", in_features=40, out_sizes=(24, 8), device=DEVICE)
    case.token_adapter[[0, 4, 8]] = -1
    # Values an `y += 0` would change (-0.0 -> +0.0) or propagate (NaN) must survive.
    case.y0[0] = -0.0
    case.y0[4] = float("nan")
    _, y = run_linear(case, use_meta=True)
    assert_untouched_rows(y, case.y0, case.token_adapter)


def test_batch_without_any_adapter():
    case = make_case(num_tokens=6, in_features=32, out_sizes=(16,), device=DEVICE)
    case.token_adapter.fill_(-1)
    buf, y = run_linear(case, use_meta=True)
    assert torch.count_nonzero(buf) == 0
    assert torch.equal(y, case.y0)


def test_empty_batch():
    case = make_case(num_tokens=0, in_features=32, out_sizes=(16,), device=DEVICE)
    buf, y = run_linear(case, use_meta=False)
    assert buf.numel() == 0 and y.numel() == 0


def test_paged_lora_linear_matches_two_ops():
    case = make_case(num_tokens=21, popularity="skewed", in_features=72, out_sizes=(30, 30), device=DEVICE)
    y = case.y0.clone()
    paged_lora_linear(
        y, case.x, case.pool, case.a_row_offsets, case.b_row_offsets, case.ranks, case.scalings,
        case.token_adapter, case.out_sizes, meta=case.meta(),
    )  # fmt: skip
    assert_close(y, case.reference_linear(), torch.float32)


SWEEP_CASES = list(itertools.product(DTYPES, POPULARITY_BATCH, SHAPES)) if SWEEP else []


@pytest.mark.skipif(not SWEEP, reason="full cross product: set SLORA_KERNEL_SWEEP=1")
@pytest.mark.parametrize("dtype,popularity_batch,shape", SWEEP_CASES)
def test_sweep(dtype, popularity_batch, shape):
    (popularity, num_tokens), (in_features, out_sizes) = popularity_batch, shape
    case = make_case(
        num_tokens=num_tokens, popularity=popularity, in_features=in_features, out_sizes=out_sizes, dtype=dtype,
        rank_choices=(1, 8, 16, 17, 64, 128), no_adapter_every=6, page_elems=2 * in_features + 3, device=DEVICE,
    )  # fmt: skip
    check(case, dtype, use_meta=True)
