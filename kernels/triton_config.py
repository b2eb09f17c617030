"""Launch configuration of every Triton launcher (block sizes, split-K, SM fill), in one place.

`get_launch_config` (after vLLM's ``get_lora_op_configs``) is the only source of the
constexpr block sizes and of split-K for kernels/triton_shrink.py and
kernels/triton_expand.py. Its inputs are static for a captured CUDA graph: the batch's
token count ``T`` (fixed per captured batch size), the tables' ``n_slices`` and width
``R`` (S_max x n_slices x R tables are allocated once), the layer's feature sizes and
the device. It never looks at token_adapter, ranks or any other per-step value, so a
graph captured in a step without adapters launches exactly what a step with adapters
would (tests/kernels/test_triton_static_tables.py checks this).

Policy defaults (identical to the hand-written values they replace) can be overridden
with a JSON file named in the environment variable ``SLORA_TRITON_CONFIG``, read once
per path. Every key is optional; unknown sections or keys are an error::

    {
      "sm_count": 132,              // SMs to fill; default: the device's
                                    // multi_processor_count (INTERPRETER_SM_COUNT off CUDA)
      "shrink_token": {             // per-token (decode) shrink, one GEMV program per
        "block_r_max": 16,          //   (token, slice, rank tile[, K split]);
        "block_k_max": 256,         //   BLOCK_R = min(block_r_max, pow2(R)),
        "split_k_max": 16,          //   BLOCK_K = min(block_k_max, pow2(in_features));
        "programs_per_sm": 2        //   split K while T*n_slices*rank_tiles < programs_per_sm*sm_count
      },
      "shrink_segment": {           // segment (prefill) shrink, tl.dot per tile of tokens
        "block_r_min": 16, "block_r_max": 64,   // BLOCK_R = clamp(pow2(R), min, max)
        "block_k_min": 16, "block_k_max": 64    // BLOCK_K = clamp(pow2(in_features), min, max)
      },
      "expand_token": {             // per-token (decode) expand
        "block_r_max": 16,          //   BLOCK_R = min(block_r_max, pow2(R))
        "block_n": 128              //   BLOCK_N
      },
      "expand_segment": {           // segment (prefill) expand
        "block_r_min": 16, "block_r_max": 32,   // BLOCK_R = clamp(pow2(R), min, max)
        "block_n_min": 16, "block_n_max": 64    // BLOCK_N = clamp(pow2(max out size), min, max)
      }
    }

(comments shown for documentation only; JSON has none). Block sizes must be powers of
two, and the segment forms' minimums at least 16 (``tl.dot`` tiles). The segment forms'
BLOCK_M is the meta's ``tile_tokens`` (kernels/metadata.py), not set here.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch
import triton

from ._triton_jit import interpreting

ENV_VAR = "SLORA_TRITON_CONFIG"
# SM count assumed off CUDA (Triton's interpreter on CPU): an H100's 132, so the
# interpreter takes the same split-K decisions as the GPU the defaults were tuned on.
INTERPRETER_SM_COUNT = 132

DEFAULTS: dict[str, dict[str, int]] = {
    "shrink_token": {"block_r_max": 16, "block_k_max": 256, "split_k_max": 16, "programs_per_sm": 2},
    "shrink_segment": {"block_r_min": 16, "block_r_max": 64, "block_k_min": 16, "block_k_max": 64},
    "expand_token": {"block_r_max": 16, "block_n": 128},
    "expand_segment": {"block_r_min": 16, "block_r_max": 32, "block_n_min": 16, "block_n_max": 64},
}
OPS = tuple(DEFAULTS)
_TOP_LEVEL_KEYS = ("sm_count",)
_NOT_BLOCKS = ("split_k_max", "programs_per_sm")  # positive ints, not necessarily powers of two


def _fail(path: str, message: str) -> None:
    raise ValueError(f"{ENV_VAR}={path}: {message}")


@functools.cache
def _load_policy(path: str | None) -> tuple[dict[str, dict[str, int]], int | None]:
    """(per-op policy, sm_count override or None) for the override file ``path`` (None: defaults)."""
    policy = {op: dict(keys) for op, keys in DEFAULTS.items()}
    if not path:
        return policy, None
    try:
        with open(path) as f:
            data: Any = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        _fail(path, f"cannot read the Triton launch config: {e}")
    if not isinstance(data, dict):
        _fail(path, "must hold a JSON object")
    sm_count = None
    for section, value in data.items():
        if section in _TOP_LEVEL_KEYS:
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                _fail(path, f"'{section}' must be a positive integer or null, got {value!r}")
            sm_count = value
            continue
        if section not in DEFAULTS:
            _fail(path, f"unknown key '{section}'; known keys: {', '.join(_TOP_LEVEL_KEYS + OPS)}")
        if not isinstance(value, dict):
            _fail(path, f"'{section}' must be an object of integer settings, got {value!r}")
        for key, setting in value.items():
            if key not in DEFAULTS[section]:
                _fail(path, f"unknown key '{section}.{key}'; known keys of '{section}': {', '.join(DEFAULTS[section])}")
            if not isinstance(setting, int) or isinstance(setting, bool) or setting < 1:
                _fail(path, f"'{section}.{key}' must be a positive integer, got {setting!r}")
            if key not in _NOT_BLOCKS and setting & (setting - 1):
                _fail(path, f"'{section}.{key}' is a block size and must be a power of two, got {setting}")
            policy[section][key] = setting
    for section in ("shrink_segment", "expand_segment"):
        for key, setting in policy[section].items():
            if key.endswith("_min") and setting < 16:
                _fail(path, f"'{section}.{key}' must be >= 16 (tl.dot tile), got {setting}")
            if key.endswith("_min") and setting > policy[section][key[: -len("_min")] + "_max"]:
                _fail(path, f"'{section}.{key}' exceeds its _max")
    return policy, sm_count


def policy() -> tuple[dict[str, dict[str, int]], int | None]:
    """The policy in force: defaults, overridden by the file named in ``SLORA_TRITON_CONFIG``."""
    return _load_policy(os.environ.get(ENV_VAR) or None)


@functools.cache
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device | str) -> int:
    """SMs of ``device`` (cached per device); INTERPRETER_SM_COUNT off CUDA or interpreted."""
    override = policy()[1]
    if override is not None:
        return override
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return INTERPRETER_SM_COUNT
    return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _clamp_pow2(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(value)))


def get_launch_config(
    op: str,  # one of OPS
    *,
    num_tokens: int,  # T of the batch: static per captured CUDA graph
    num_slices: int,  # tables' n_slices (static)
    max_rank: int,  # tables' width R (static), never the ranks actually used
    features: int,  # shrink: in_features; expand: the widest slice, max(out_sizes)
    device: torch.device | str,
) -> dict[str, int]:
    """The constexprs of one launch: BLOCK_R, BLOCK_K | BLOCK_N, and SPLIT_K (shrink_token).

    Depends only on its arguments (static for a captured graph), the device's SM count
    and the override file; never on a device tensor's contents, so it is capture-safe.
    """
    ops, _ = policy()
    if op not in ops:
        raise ValueError(f"unknown Triton launcher {op!r}; known: {', '.join(OPS)}")
    p = ops[op]
    pow2_rank = triton.next_power_of_2(max_rank)
    if op == "shrink_token":
        block_r = min(p["block_r_max"], pow2_rank)
        block_k = min(p["block_k_max"], triton.next_power_of_2(features))
        programs = num_tokens * num_slices * triton.cdiv(max_rank, block_r)
        # Small batches cannot fill the GPU with one program per rank tile: split K too
        # (partial sums meet through fp32 atomics, so the launcher zeroes `out` first).
        fill = p["programs_per_sm"] * sm_count(device)
        split_k = 1
        if programs < fill:
            split_k = min(triton.cdiv(features, block_k), triton.cdiv(fill, programs), p["split_k_max"])
        return {"BLOCK_R": block_r, "BLOCK_K": block_k, "SPLIT_K": max(1, split_k)}
    if op == "shrink_segment":
        return {
            "BLOCK_R": _clamp_pow2(max_rank, p["block_r_min"], p["block_r_max"]),
            "BLOCK_K": _clamp_pow2(features, p["block_k_min"], p["block_k_max"]),
        }
    if op == "expand_token":
        return {"BLOCK_R": min(p["block_r_max"], pow2_rank), "BLOCK_N": p["block_n"]}
    return {  # expand_segment
        "BLOCK_R": _clamp_pow2(max_rank, p["block_r_min"], p["block_r_max"]),
        "BLOCK_N": _clamp_pow2(features, p["block_n_min"], p["block_n_max"]),
    }
