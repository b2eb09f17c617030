"""vLLM with the plugin enabled gives the same greedy tokens as HF transformers (+ PEFT).

The reference is independent of the code under test: HF transformers runs the same
safetensors weights, PEFT applies the same adapter files.
"""

from __future__ import annotations

import pytest

from tests.hf_reference import hf_greedy, trim_after_eos

pytestmark = pytest.mark.engine

MAX_TOKENS = 16
PROMPTS = [
    "The capital of France is",
    "A list of three fruits: apple,",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def prompt_ids(default_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model)
    return [tok(p)["input_ids"] for p in PROMPTS]


def _vllm_greedy(llm, prompt_ids, lora_request=None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, lora_request=lora_request)
    return [list(o.outputs[0].token_ids) for o in outs]


def _eos_ids(model_dir):
    import json

    eos = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
    return set(eos if isinstance(eos, list) else [eos])


def test_base_model_matches_hf(slora_llm, default_model, prompt_ids):
    got = _vllm_greedy(slora_llm, prompt_ids)
    want = hf_greedy(default_model, prompt_ids, MAX_TOKENS)
    eos = _eos_ids(default_model)
    assert [trim_after_eos(g, eos) for g in got] == [trim_after_eos(w, eos) for w in want]


def test_single_adapter_matches_hf_peft(slora_llm, default_model, default_adapters, prompt_ids):
    from vllm.lora.request import LoRARequest

    adapter = default_adapters[1]  # rank 16
    lora = LoRARequest(adapter.name, 1, str(adapter.path))
    got = _vllm_greedy(slora_llm, prompt_ids, lora_request=lora)
    want = hf_greedy(default_model, prompt_ids, MAX_TOKENS, adapter_dir=adapter.path)
    base = hf_greedy(default_model, prompt_ids, MAX_TOKENS)
    eos = _eos_ids(default_model)
    assert [trim_after_eos(g, eos) for g in got] == [trim_after_eos(w, eos) for w in want]
    # Guard against a vacuous pass: the adapter must change what the model says.
    assert want != base, "generated adapter does not change the greedy output"


def test_default_model_answers_sensibly(slora_llm):
    from vllm import SamplingParams

    out = slora_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=24),
    )
    assert "Paris" in out[0].outputs[0].text
