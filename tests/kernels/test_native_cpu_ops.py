"""The native C++ CPU kernel (torch.ops.slora_cpu.*) against the torch reference and the dense oracle.

Every ISA path this CPU supports runs every case (SLORA_CPU_ISA is read on each call).
Axes as in test_paged_lora_ops.py: adapter popularity x ragged batches 1..133, ranks
1..128 in one batch, odd and TP-sliced sizes, 1-3 slices with absent slices, tokens
without adapter (exact bits, every dtype), shuffled pages, every pool element outside
the rows in use NaN, buf / y / x / out as strided views of bigger tensors, fp32/bf16/fp16.
Plus opcheck, torch.compile, thread-count invariance and the argument checks.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from kernels import cpu_native
from kernels.torch_ops import expand_torch, shrink_torch
from tests.kernels.lora_cases import POPULARITIES, assert_close, assert_untouched_rows, make_case

if not cpu_native.available():
    pytest.skip(cpu_native.unavailable_reason(), allow_module_level=True)

ISAS = cpu_native.supported_isas()
BATCH_SIZES = [1, 2, 3, 7, 16, 64, 133]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (in_features, out_sizes): odd, Llama-2-7B QKV / gate-up TP-sliced, down_proj at TP=4
    (2049, (2049,)),
    (4096 // 2, (4096 // 2, 4096 // 2, 4096 // 2)),
    (4096, (11008 // 2, 11008 // 2)),
    (11008 // 4, (4096,)),
]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("SLORA_CPU_ISA", request.param)
    assert cpu_native.isa() == request.param
    return request.param


def poison_unused(case) -> None:
    """NaN every pool element outside the rows the batch's adapters use (in place)."""
    used = torch.zeros(case.pool.numel(), dtype=torch.bool)
    in_features = case.x.shape[1]
    adapters = sorted({a for a in case.token_adapter.tolist() if a >= 0})
    for a in adapters:
        for s, out_size in enumerate(case.out_sizes):
            r = int(case.ranks[a, s])
            for offsets, length in ((case.a_row_offsets, in_features), (case.b_row_offsets, out_size)):
                for off in offsets[a, s, :r].tolist():
                    used[off : off + length] = True
    case.pool[~used] = float("nan")


@functools.cache
def cached_case(**kwargs):
    """A case with its oracle results and the torch reference's, built once for all ISAs."""
    case = make_case(**kwargs)
    poison_unused(case)
    num_slices, num_tokens, width = case.num_slices, case.x.shape[0], case.a_row_offsets.shape[2]
    ref_buf = torch.full((num_slices, num_tokens, width), 7.0)
    shrink_torch(case.x, case.pool, case.a_row_offsets, case.ranks, case.token_adapter, ref_buf)
    ref_y = case.y0.clone()
    expand_torch(ref_buf, case.pool, case.b_row_offsets, case.ranks, case.scalings, case.token_adapter, ref_y,
                 case.out_sizes)  # fmt: skip
    return case, case.reference_shrink(), case.reference_linear(), ref_buf, ref_y


def run_native(case, buf: torch.Tensor | None = None, y: torch.Tensor | None = None):
    if buf is None:
        buf = torch.full((case.num_slices, case.x.shape[0], case.a_row_offsets.shape[2]), 7.0)
    if y is None:
        y = case.y0.clone()
    cpu_native.shrink(case.x, case.pool, case.a_row_offsets, case.ranks, case.token_adapter, buf)
    cpu_native.expand(buf, case.pool, case.b_row_offsets, case.ranks, case.scalings, case.token_adapter, y,
                      case.out_sizes)  # fmt: skip
    return buf, y


def check(dtype, **kwargs) -> None:
    case, oracle_buf, oracle_y, ref_buf, ref_y = cached_case(dtype=dtype, **kwargs)
    buf, y = run_native(case)
    shrink_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    assert_close(buf, oracle_buf, shrink_dtype)
    assert_close(y, oracle_y, dtype)
    torch.testing.assert_close(buf, ref_buf, atol=1e-5, rtol=1e-5)  # same inputs, fp32 both: near exact
    assert_close(y, ref_y, dtype)
    assert torch.isfinite(buf).all() and torch.isfinite(y).all(), "a NaN from outside the used rows leaked"
    assert_untouched_rows(y, case.y0, case.token_adapter)


@pytest.mark.parametrize("popularity,num_tokens", list(itertools.product(POPULARITIES, BATCH_SIZES)))
def test_popularity_and_batch(isa, popularity, num_tokens):
    check(
        torch.float32, num_tokens=num_tokens, popularity=popularity, in_features=96, out_sizes=(64, 32, 32),
        no_adapter_every=5, shuffle_tokens=num_tokens % 2 == 1, seed=num_tokens,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_features,out_sizes", SHAPES, ids=lambda v: str(v))
def test_dtypes_and_model_shapes(isa, dtype, in_features, out_sizes):
    check(
        dtype, num_tokens=11, popularity="zipf", in_features=in_features, out_sizes=out_sizes,
        rank_choices=(8, 16, 32, 64), no_adapter_every=7, page_elems=3 * in_features + 5,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ranks_1_to_128_in_one_batch(isa, dtype):
    ranks = (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128)
    check(
        dtype, num_tokens=len(ranks) * 3, popularity="uniform", in_features=257, out_sizes=(129, 40),
        rank_choices=ranks, absent_slices=False, no_adapter_every=4, page_elems=4000,
    )  # fmt: skip


@pytest.mark.parametrize("num_slices", [1, 2, 3])
@pytest.mark.parametrize("shuffle_tokens", [False, True], ids=["runs", "shuffled"])
def test_slices_and_token_order(isa, num_slices, shuffle_tokens):
    check(
        torch.float32, num_tokens=40, popularity="uniform", in_features=80, out_sizes=(24, 40, 16)[:num_slices],
        shuffle_tokens=shuffle_tokens, no_adapter_every=3,
    )  # fmt: skip


def test_prefill_runs_longer_than_a_token_tile(isa):
    """One adapter owning hundreds of consecutive tokens (split across work items)."""
    check(torch.bfloat16, num_tokens=300, popularity="skewed", in_features=130, out_sizes=(70, 300),
          shuffle_tokens=False, rank_choices=(16, 64))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tokens_without_adapter_keep_exact_bits(isa, dtype):
    case = make_case(num_tokens=9, popularity="uniform", in_features=40, out_sizes=(24, 8), dtype=dtype)
    case.token_adapter[[0, 4, 8]] = -1
    # Values an `y += 0` would change (-0.0 -> +0.0) or propagate (NaN) must survive.
    case.y0[0] = -0.0
    case.y0[4] = float("nan")
    buf, y = run_native(case)
    assert_untouched_rows(y, case.y0, case.token_adapter)
    assert torch.count_nonzero(buf[:, [0, 4, 8]]) == 0


def test_absent_slices_leave_their_columns_untouched(isa):
    case = make_case(num_tokens=12, popularity="identical", in_features=32, out_sizes=(16, 8, 24),
                     absent_slices=False)  # fmt: skip
    case.ranks[0, 1] = 0  # slice 1 absent for the only adapter
    case.y0[:, 16:24] = -0.0
    buf, y = run_native(case)
    assert torch.equal(y[:, 16:24].view(torch.int32), case.y0[:, 16:24].view(torch.int32))
    assert torch.count_nonzero(buf[1]) == 0


def test_batch_without_any_adapter(isa):
    case = make_case(num_tokens=6, in_features=32, out_sizes=(16,))
    case.token_adapter.fill_(-1)
    buf, y = run_native(case)
    assert torch.count_nonzero(buf) == 0
    assert torch.equal(y, case.y0)


def test_empty_batch(isa):
    case = make_case(num_tokens=0, in_features=32, out_sizes=(16,))
    buf, y = run_native(case)
    assert buf.numel() == 0 and y.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_views(isa, dtype):
    """x / out / buf / y as views of bigger tensors: only the view's elements change."""
    case, oracle_buf, oracle_y, _, _ = cached_case(
        dtype=dtype, num_tokens=23, popularity="zipf", in_features=72, out_sizes=(40, 24), no_adapter_every=4,
    )  # fmt: skip
    num_slices, num_tokens, width = case.num_slices, case.x.shape[0], case.a_row_offsets.shape[2]
    x_wide = torch.randn(num_tokens, 72 + 9).to(dtype)
    x_wide[:, 5 : 5 + 72] = case.x
    x = x_wide[:, 5 : 5 + 72]  # row stride 81
    # out / buf: [S, T, R + 3] cut from a bigger tensor (token stride 2 * (R + 8), slice offset 1)
    big = torch.full((num_slices + 1, 2 * num_tokens, width + 8), 5.0)
    out = big[1:, ::2, 2 : 2 + width + 3]
    y_wide = torch.randn(num_tokens, 7 + case.y0.shape[1] + 5).to(dtype)
    y_wide[:, 7 : 7 + case.y0.shape[1]] = case.y0
    before = y_wide.clone()
    y = y_wide[:, 7 : 7 + case.y0.shape[1]]
    cpu_native.shrink(x, case.pool, case.a_row_offsets, case.ranks, case.token_adapter, out)
    assert torch.count_nonzero(out[..., width:]) == 0  # past R: zero
    shrink_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    assert_close(out[..., :width], oracle_buf, shrink_dtype)
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[1:, ::2, 2 : 2 + width + 3] = False
    assert (big[mask] == 5.0).all(), "shrink wrote outside out's view"
    cpu_native.expand(out, case.pool, case.b_row_offsets, case.ranks, case.scalings, case.token_adapter, y,
                      case.out_sizes)  # fmt: skip
    assert_close(y, oracle_y, dtype)
    assert torch.equal(y_wide[:, :7], before[:, :7]) and torch.equal(y_wide[:, -5:], before[:, -5:])
    assert_untouched_rows(y, case.y0, case.token_adapter)


def test_thread_count_is_invisible():
    """Bit-identical results for 1 and 2 threads (each output element has one owner)."""
    case, *_ = cached_case(dtype=torch.bfloat16, num_tokens=133, popularity="zipf", in_features=96,
                           out_sizes=(64, 32, 32), no_adapter_every=5)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_native(case)
        torch.set_num_threads(2)
        two = run_native(case)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_isa_selection(monkeypatch):
    widest = cpu_native.detected_isa()
    monkeypatch.delenv("SLORA_CPU_ISA", raising=False)
    assert cpu_native.isa() == widest
    monkeypatch.setenv("SLORA_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="not one of avx512, avx2, scalar"):
        cpu_native.isa()
    if widest != "avx512":
        monkeypatch.setenv("SLORA_CPU_ISA", "avx512")
        with pytest.raises(RuntimeError, match="wider ISA than this CPU supports"):
            cpu_native.isa()


def test_argument_checks():
    case = make_case(num_tokens=4, in_features=32, out_sizes=(16,))
    buf = torch.zeros(1, 4, case.a_row_offsets.shape[2])
    with pytest.raises(RuntimeError, match="pool dtype"):
        cpu_native.shrink(case.x, case.pool.half(), case.a_row_offsets, case.ranks, case.token_adapter, buf)
    with pytest.raises(RuntimeError, match="out must be float32"):
        cpu_native.shrink(case.x, case.pool, case.a_row_offsets, case.ranks, case.token_adapter, buf.double())
    with pytest.raises(RuntimeError, match="token_adapter"):
        bad = case.token_adapter.clone()
        bad[0] = 99
        cpu_native.shrink(case.x, case.pool, case.a_row_offsets, case.ranks, bad, buf)
    with pytest.raises(RuntimeError, match="leaves the pool"):
        cpu_native.shrink(case.x, case.pool[:100], case.a_row_offsets, case.ranks, case.token_adapter, buf)
    with pytest.raises(RuntimeError, match="out_sizes"):
        cpu_native.expand(buf, case.pool, case.b_row_offsets, case.ranks, case.scalings, case.token_adapter,
                          case.y0.clone(), [15])  # fmt: skip
    with pytest.raises(RuntimeError, match="y must have a unit column stride"):
        cpu_native.expand(buf, case.pool, case.b_row_offsets, case.ranks, case.scalings, case.token_adapter,
                          case.y0.t().contiguous().t(), [16])  # fmt: skip


def test_opcheck():
    case = make_case(num_tokens=10, popularity="uniform", in_features=40, out_sizes=(24, 8), no_adapter_every=3)
    buf = torch.zeros(case.num_slices, 10, case.a_row_offsets.shape[2])
    torch.library.opcheck(torch.ops.slora_cpu.shrink.default,
                          (case.x, case.pool, case.a_row_offsets, case.ranks, case.token_adapter, buf))  # fmt: skip
    torch.library.opcheck(
        torch.ops.slora_cpu.expand.default,
        (buf, case.pool, case.b_row_offsets, case.ranks, case.scalings, case.token_adapter, case.y0.clone(),
         case.out_sizes),
    )  # fmt: skip


def test_torch_compile_smoke():
    case = make_case(num_tokens=13, popularity="zipf", in_features=48, out_sizes=(32, 16), no_adapter_every=4)
    out_sizes = case.out_sizes

    def lora(x, y, pool, a_offsets, b_offsets, ranks, scalings, token_adapter):
        buf = torch.empty(len(out_sizes), x.shape[0], a_offsets.shape[2], dtype=torch.float32)
        torch.ops.slora_cpu.shrink(x, pool, a_offsets, ranks, token_adapter, buf)
        y = y * 1.0  # a fresh output the op updates in place
        torch.ops.slora_cpu.expand(buf, pool, b_offsets, ranks, scalings, token_adapter, y, out_sizes)
        return y + 0.0

    args = (case.x, case.y0, case.pool, case.a_row_offsets, case.b_row_offsets, case.ranks, case.scalings,
            case.token_adapter)  # fmt: skip
    # aot_eager: dynamo + AOT tracing through the fake impls, without inductor's minute-long cold codegen
    compiled = torch.compile(lora, fullgraph=True, dynamic=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), lora(*args), atol=1e-6, rtol=1e-6)
