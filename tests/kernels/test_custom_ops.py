"""The ops as torch custom ops: opaque to torch.compile, registered once, CPU-only safe."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernels  # noqa: F401  (registers torch.ops.slora.*)
from tests.kernels.lora_cases import assert_close, make_case

REPO = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case():
    return make_case(num_tokens=11, popularity="uniform", in_features=48, out_sizes=(16, 8), no_adapter_every=4,
                     device=DEVICE)  # fmt: skip


def test_opcheck_shrink_and_expand():
    case = _case()
    buf = torch.zeros(2, 11, case.a_row_offsets.shape[2], device=DEVICE)
    shrink_args = (case.x, case.pool, case.a_row_offsets, case.ranks, case.token_adapter, buf)
    # test_autograd_registration does not apply: the ops are inference-only.
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.slora.paged_lora_shrink, shrink_args, test_utils=utils)
    torch.ops.slora.paged_lora_shrink(*shrink_args)
    expand_args = (buf, case.pool, case.b_row_offsets, case.ranks, case.scalings, case.token_adapter,
                   case.y0.clone(), case.out_sizes)  # fmt: skip
    torch.library.opcheck(torch.ops.slora.paged_lora_expand, expand_args, test_utils=utils)


def test_fullgraph_compile_matches_eager():
    case = _case()
    meta = case.meta()

    def lora(y, x):
        kernels.paged_lora_linear(
            y, x, case.pool, case.a_row_offsets, case.b_row_offsets, case.ranks, case.scalings,
            case.token_adapter, case.out_sizes, meta=meta,
        )  # fmt: skip
        return y

    compiled = torch.compile(lora, backend="aot_eager", fullgraph=True)
    y = compiled(case.y0.clone(), case.x)
    assert_close(y, case.reference_linear(), torch.float32)


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_second_import_under_another_name_reuses_the_ops():
    # As when `kernels` (tests) and `vllm_slora.kernels` (installed plugin) meet in one process.
    out = _run("""
        import importlib.util, sys
        import kernels
        spec = importlib.util.spec_from_file_location(
            "alias_pkg", "kernels/__init__.py", submodule_search_locations=["kernels"])
        alias = importlib.util.module_from_spec(spec)
        sys.modules["alias_pkg"] = alias
        spec.loader.exec_module(alias)
        assert alias.ops is not kernels.ops
        assert alias.ops._LIBRARY is None  # found the ops already defined
        print("ok")
    """)
    assert out.strip() == "ok"


def test_import_and_cpu_ops_without_triton():
    out = _run("""
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch, kernels
        assert not kernels.HAS_TRITON
        x = torch.randn(2, 8); pool = torch.randn(100)
        offs = torch.tensor([[[0, 8]]]); ranks = torch.tensor([[2]], dtype=torch.int32)
        out = torch.empty(1, 2, 2)
        kernels.paged_lora_shrink(x, pool, offs, ranks, torch.tensor([0, -1], dtype=torch.int32), out)
        assert torch.allclose(out[0, 0], x[0] @ pool[:16].view(2, 8).t()) and not out[0, 1].any()
        print("ok")
    """)
    assert out.strip() == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_tokens", [8, 160])  # per-token and segment forms
def test_cuda_graph_replay_matches_eager(num_tokens):
    case = make_case(num_tokens=num_tokens, popularity="zipf", in_features=512, out_sizes=(256, 64, 64),
                     no_adapter_every=5, device="cuda")  # fmt: skip
    meta = kernels.PagedLoRAMeta(256, 64, "cuda", segment_min_tokens=128)
    token_adapter = case.token_adapter.clone()
    buf = torch.empty(3, num_tokens, case.a_row_offsets.shape[2], device="cuda")
    y = case.y0.clone()

    def step():
        y.copy_(case.y0)
        kernels.paged_lora_linear(
            y, case.x, case.pool, case.a_row_offsets, case.b_row_offsets, case.ranks, case.scalings,
            token_adapter, case.out_sizes, meta=meta, buf=buf,
        )  # fmt: skip

    meta.prepare(token_adapter)
    step()  # warm-up compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # A new step: new mapping written in place, metadata prepared outside the graph.
    token_adapter.copy_(token_adapter.flip(0))
    meta.prepare(token_adapter)
    graph.replay()
    replayed = y.clone()
    step()
    torch.testing.assert_close(replayed, y, atol=1e-5, rtol=1e-5)  # split-K atomics reorder sums
    case.token_adapter = token_adapter
    assert_close(replayed, case.reference_linear(), torch.float32)
