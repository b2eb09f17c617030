"""The few numbers of a Llama-style decoder that the functional forward needs.

Read from a HF `config.json` dict or a `PretrainedConfig`, in either spelling of RoPE:
transformers >= 5 writes ``rope_parameters: {rope_type, rope_theta, ...}``; older files
carry ``rope_theta`` plus an optional ``rope_scaling`` dict (``type`` or ``rope_type``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# RoPE variants the functional forward computes itself (see rope.py). Others (yarn,
# dynamic, longrope, ...) change attention scaling or depend on sequence length; they
# are refused rather than silently computed as plain RoPE.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class RopeSettings:
    rope_type: str = "default"
    theta: float = DEFAULT_ROPE_THETA
    # Only the keys a variant uses (factor, low_freq_factor, ...), as in the config.
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: RopeSettings

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def features(self, projection: str) -> tuple[int, int]:
        """(in_features, out_features) of one of the seven Llama projections."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[projection]

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | Any) -> DecoderConfig:
        """From a config.json dict, a path to one (file or model dir), or a PretrainedConfig."""
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                config = json.load(f)
        elif not isinstance(config, Mapping):
            config = config.to_dict()
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only SiLU MLPs are supported, config has hidden_act {config['hidden_act']!r}")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ValueError("projection biases (attention_bias / mlp_bias) are not supported")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope=_rope_settings(config),
        )


def _rope_settings(config: Mapping[str, Any]) -> RopeSettings:
    params = dict(config.get("rope_parameters") or {})
    if not params:  # pre-5 spelling
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported by the training forward (supported: {SUPPORTED_ROPE_TYPES})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    theta = float(params.pop("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA)))
    return RopeSettings(rope_type=rope_type, theta=theta, params=params)
