"""Bad adapters are rejected with an error naming them; the engine keeps serving.

Offline API (`LLM`) here; the OpenAI-server variant is in test_server.py.
"""

from __future__ import annotations

import pytest

from tests.bad_adapters import BREAKERS, STATUS, make_bad_adapters, make_model_bad_adapters
from tests.engines import close_llm, make_llm

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def bad_adapters(default_model, default_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    cases = make_bad_adapters(default_adapters[0].path, root)
    cases.update(make_model_bad_adapters(default_model / "config.json", root))
    return cases


CASES = [*BREAKERS, "rank_above_max", "wrong_shapes"]


@pytest.mark.parametrize("case", CASES)
def test_bad_adapter_is_rejected_and_engine_keeps_serving(slora_llm, bad_adapters, default_adapters, case):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMNotFoundError, VLLMValidationError
    from vllm.lora.request import LoRARequest

    path, needle = bad_adapters[case]
    name = f"bad-{case}"
    params = SamplingParams(temperature=0.0, max_tokens=4)
    expected = VLLMNotFoundError if STATUS.get(case) == 404 else VLLMValidationError
    with pytest.raises(expected) as err:
        slora_llm.generate(["Hello"], params, lora_request=LoRARequest(name, 5000 + CASES.index(case), str(path)))
    assert name in str(err.value) and needle in str(err.value)

    good = default_adapters[0]
    out = slora_llm.generate(
        ["Hello", "Hello"], params,
        lora_request=[LoRARequest(good.name, 11, good.path), None],
    )
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)


def test_adapter_larger_than_the_whole_pool(tiny_model, tmp_path):
    """A pool of a few blocks: a rank-64 adapter can never fit, a rank-4 one can."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.request import LoRARequest

    from vllm_slora.adapters.generate import generate_adapters

    small, huge = generate_adapters(tiny_model / "config.json", tmp_path, 2, ranks=(4, 64), seed=3)
    # 6 blocks of 128 KiB; the rank-64 adapter needs 12 (tests/test_pool_scale.py arithmetic).
    llm = make_llm(tiny_model, slora={}, max_model_len=256, kv_cache_memory_bytes=6 * 128 * 1024)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        with pytest.raises(VLLMValidationError) as err:
            llm.generate(["the quick brown fox"], params, lora_request=LoRARequest(huge.name, 2, huge.path))
        assert huge.name in str(err.value) and "pool" in str(err.value), str(err.value)
        out = llm.generate(["the quick brown fox", "a stitch in time"], params,
                           lora_request=[LoRARequest(small.name, 1, small.path), None], use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]
    finally:
        close_llm(llm)
