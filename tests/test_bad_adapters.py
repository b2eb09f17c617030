"""Bad adapters are rejected with an error naming them; the engine keeps serving.

Offline API (`LLM`) here; the OpenAI-server variant is in test_server.py.
"""

from __future__ import annotations

import pytest

from tests.bad_adapters import make_bad_adapters

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def bad_adapters(default_model, default_adapters, tmp_path_factory):
    from vllm_slora.adapters.generate import generate_adapters

    root = tmp_path_factory.mktemp("bad")
    cases = make_bad_adapters(default_adapters[0].path, root)
    # Rank above --max-lora-rank 64, and weights of another model's shapes.
    (too_big,) = generate_adapters(default_model / "config.json", root, 1, ranks=(128,), name_prefix="rank128")
    cases["rank_above_max"] = (too_big.path, "above max_lora_rank 64")
    other_base = dict(
        model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=30,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
    )
    (wrong,) = generate_adapters(other_base, root, 1, ranks=(8,), name_prefix="othermodel")
    cases["wrong_shapes"] = (wrong.path, "has shape")
    return cases


CASES = ["missing_weights", "truncated", "corrupt", "dora", "modules_to_save",
         "unsupported_target", "pickle_only", "rank_above_max", "wrong_shapes"]


@pytest.mark.parametrize("case", CASES)
def test_bad_adapter_is_rejected_and_engine_keeps_serving(slora_llm, bad_adapters, default_adapters, case):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.request import LoRARequest

    path, needle = bad_adapters[case]
    name = f"bad-{case}"
    params = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(VLLMValidationError) as err:
        slora_llm.generate(["Hello"], params, lora_request=LoRARequest(name, 5000 + CASES.index(case), str(path)))
    assert name in str(err.value) and needle in str(err.value)

    good = default_adapters[0]
    out = slora_llm.generate(
        ["Hello", "Hello"], params,
        lora_request=[LoRARequest(good.name, 11, good.path), None],
    )
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)
