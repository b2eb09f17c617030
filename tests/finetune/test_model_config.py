"""Reading the decoder's numbers from config.json in both RoPE spellings, and refusing what the forward cannot do."""

from __future__ import annotations

import pytest

from vllm_slora.finetune.model_config import DecoderConfig, RopeSettings

BASE = dict(
    vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5,
)
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def test_both_rope_spellings_give_the_same_settings():
    new = DecoderConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3}})
    old = DecoderConfig.from_hf({**BASE, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **LLAMA3}})
    assert new.rope == old.rope == RopeSettings("llama3", 5e5, LLAMA3)
    plain = DecoderConfig.from_hf(BASE)
    assert plain.rope == RopeSettings("default", 10000.0, {})
    assert (plain.head_dim, plain.q_size, plain.kv_size) == (16, 64, 32)
    assert plain.features("o_proj") == (64, 64) and plain.features("down_proj") == (128, 64)


@pytest.mark.parametrize(
    "extra, problem",
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE type 'yarn'"),
        ({"hidden_act": "gelu"}, "SiLU"),
        ({"attention_bias": True}, "biases"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial"),
    ],
)
def test_unsupported_configs_are_refused(extra, problem):
    with pytest.raises(ValueError, match=problem):
        DecoderConfig.from_hf({**BASE, **extra})
