"""The Triton kernels themselves (both forms), against the dense oracle.

Without CUDA they run in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, so
shapes stay small; with CUDA they run compiled. test_paged_lora_ops.py covers the
public ops at full shapes on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.lora_cases import (
    POPULARITIES,
    assert_close,
    assert_untouched_rows,
    make_case,
    require_triton_interpreter,
)

triton = pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"



@pytest.fixture(autouse=True)
def triton_interpreter():
    """Without a GPU, Triton must have been imported in interpreter mode (conftest.py)."""
    require_triton_interpreter()


def run_triton(case, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    from kernels.triton_expand import expand_segment, expand_token
    from kernels.triton_shrink import shrink_segment, shrink_token

    num_tokens = case.x.shape[0]
    buf = torch.full((case.num_slices, num_tokens, case.a_row_offsets.shape[2]), 7.0, device=case.x.device)
    y = case.y0.clone()
    if form == "token":
        shrink_token(case.x, case.pool, case.a_row_offsets, case.ranks, case.token_adapter, buf)
        expand_token(
            buf, case.pool, case.b_row_offsets, case.ranks, case.scalings, case.token_adapter, y, case.out_sizes
        )
    else:
        meta = case.meta(tile_tokens=16)
        n_tiles = meta.num_tiles(num_tokens)
        shrink_segment(
            case.x, case.pool, case.a_row_offsets, case.ranks, meta.token_order, meta.tiles, n_tiles, 16, buf
        )
        expand_segment(
            buf, case.pool, case.b_row_offsets, case.ranks, case.scalings, meta.token_order, meta.tiles, n_tiles, 16,
            y, case.out_sizes,
        )  # fmt: skip
    return buf, y


def check(case, dtype, form: str) -> None:
    buf, y = run_triton(case, form)
    assert_close(buf, case.reference_shrink(), torch.float32 if dtype == torch.float32 else torch.float16)
    assert_close(y, case.reference_linear(), dtype)
    assert_untouched_rows(y, case.y0, case.token_adapter)


FORMS = ["token", "segment"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("num_tokens", [1, 7, 19] if not ON_GPU else [1, 7, 64, 133])
def test_popularity_and_batch(form, popularity, num_tokens):
    case = make_case(
        num_tokens=num_tokens, popularity=popularity, in_features=40 if not ON_GPU else 2049,
        out_sizes=(24, 8, 16) if not ON_GPU else (512, 128, 128), rank_choices=(1, 3, 8, 17),
        no_adapter_every=4, device=DEVICE, seed=num_tokens,
        page_elems=1000 if not ON_GPU else 3 * 2049 + 7,
    )  # fmt: skip
    check(case, torch.float32, form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(form, dtype):
    case = make_case(
        num_tokens=9, popularity="zipf", in_features=33, out_sizes=(20, 12), dtype=dtype,
        rank_choices=(2, 16, 19), no_adapter_every=3, device=DEVICE,
    )  # fmt: skip
    check(case, dtype, form)


@pytest.mark.parametrize("form", FORMS)
def test_ranks_up_to_128_and_split_k(form):
    """One batch mixing ranks 1..128; in_features > BLOCK_K so the decode form splits K."""
    case = make_case(
        num_tokens=6, popularity="distinct", in_features=300, out_sizes=(20,),
        rank_choices=(1, 9, 31, 64, 100, 128), device=DEVICE, page_elems=2000,
    )  # fmt: skip
    check(case, torch.float32, form)


@pytest.mark.parametrize("form", FORMS)
def test_tokens_without_adapter_keep_exact_bits(form):
    case = make_case(num_tokens=5, in_features=24, out_sizes=(16, 8), device=DEVICE)
    case.token_adapter[[0, 3]] = -1
    case.y0[0] = -0.0
    case.y0[3] = float("nan")
    buf, y = run_triton(case, form)
    assert_untouched_rows(y, case.y0, case.token_adapter)
    assert torch.count_nonzero(buf[:, [0, 3]]) == 0
