"""Rotary position embeddings for packed sequences, computed out of place.

vLLM's own rotary op rotates q/k in place and has no backward, so training computes
cos/sin itself. Positions restart at 0 for every sequence of a packed micro-batch, so
each sequence sees exactly the rotations it would see alone. The rotation pairs the two
halves of each head (GPT-NeoX style, what HF Llama and vLLM's Llama use).
"""

from __future__ import annotations

import math

import torch

from .model_config import RopeSettings


def inverse_frequencies(rope: RopeSettings, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] float32 angular frequency of each rotated pair."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        # Positions stretched by `factor` == frequencies divided by it.
        inv_freq = inv_freq / float(rope.params["factor"])
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, rope.params)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, params) -> torch.Tensor:
    # Llama 3.1: long wavelengths (low frequencies) are slowed by `factor`, short ones are
    # kept, and the band in between blends the two linearly in 1/wavelength.
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    original = float(params["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    slowed = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    blend = (original / wavelength - low) / (high - low)
    blended = (1 - blend) * slowed / factor + blend * slowed
    in_band = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(in_band, blended, slowed)


def rope_cos_sin(
    inv_freq: torch.Tensor,  # [head_dim // 2] float32
    position_ids: torch.Tensor,  # [T] int64, restarting at 0 per sequence
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [T, head_dim] each, both halves repeated, in `dtype`."""
    angles = position_ids.to(torch.float32)[:, None] * inv_freq.to(position_ids.device)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(
    x: torch.Tensor,  # [heads, T, head_dim]
    cos: torch.Tensor,  # [T, head_dim]
    sin: torch.Tensor,  # [T, head_dim]
) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
