"""Synthetic PEFT LoRA adapters for any Llama-family model, for tests and benchmarks.

The files are exactly what PEFT's `save_pretrained` writes (`adapter_config.json` +
`adapter_model.safetensors`, keys ``base_model.model.<module>.lora_{A,B}.weight``), so
PEFT, stock vLLM and vllm-slora all load them.

Weights are random but meaningful: B is non-zero (a zero B, PEFT's initialisation,
would make every correctness test pass vacuously). A ~ N(0, 1/in) keeps ``A x`` at the
scale of ``x``; B's std is chosen per module as ``output_scale / (scaling * sqrt(r))``,
so the LoRA delta ``scaling * B A x`` has about ``output_scale`` times the RMS of ``x``
whatever the rank, alpha or rslora setting: big enough to change greedy outputs,
small enough to stay numerically sane. The default 0.25 was checked on
SmolLM2-135M-Instruct: "The capital of France is" still continues " Paris." under every
adapter, and the continuation after it differs from the base model's and between
adapters of different ranks.

Default ``lora_alpha`` is ``2 * r`` (scaling 2, a common finetuning choice) so scaling
is exercised with a value other than 1.

Usage: ``python -m vllm_slora.adapters.generate CONFIG OUT_DIR -n 32 --ranks 8,16,32,64``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .base_model import BaseModelShape, load_hf_config
from .modules import SLICE_ORDER, module_name
from .peft_config import parse_lora_config

_GENERATOR_VERSION = 1
_FINGERPRINT_KEY = "vllm_slora_generator"


class GeneratedAdapter(NamedTuple):
    name: str
    path: str
    rank: int


def _adapter_config(
    base_name: str | None, rank: int, alpha: float, target_modules: Sequence[str], use_rslora: bool,
    rank_pattern: Mapping[str, int], alpha_pattern: Mapping[str, float],
) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(target_modules),
        "use_rslora": use_rslora,
        "rank_pattern": dict(rank_pattern),
        "alpha_pattern": dict(alpha_pattern),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def _existing_fingerprint(weights_path: str) -> str | None:
    try:
        with safe_open(weights_path, framework="pt") as f:
            return (f.metadata() or {}).get(_FINGERPRINT_KEY)
    except Exception:  # absent or broken: regenerate
        return None


def _write_adapter(
    adapter_dir: str, config: dict[str, Any], base: BaseModelShape, seed: int,
    dtype: torch.dtype, output_scale: float, fingerprint: str,
) -> None:
    params = parse_lora_config(os.path.basename(adapter_dir), config)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(base.num_layers):
        for proj in SLICE_ORDER:
            module = module_name(layer, proj)
            if not params.targets(module):
                continue
            rank, scaling = params.rank_for(module), params.scaling_for(module)
            in_features, out_features = base.features(proj)
            a = torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features)
            b = torch.randn(out_features, rank, generator=gen) * (output_scale / (scaling * math.sqrt(rank)))
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype).contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype).contiguous()
    os.makedirs(adapter_dir, exist_ok=True)
    # Write to temporary names and rename, so a crash never leaves a half adapter that
    # a later run would mistake for a finished one.
    tmp_weights = os.path.join(adapter_dir, ".adapter_model.safetensors.tmp")
    save_file(tensors, tmp_weights, metadata={"format": "pt", _FINGERPRINT_KEY: fingerprint})
    tmp_config = os.path.join(adapter_dir, ".adapter_config.json.tmp")
    with open(tmp_config, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp_config, os.path.join(adapter_dir, "adapter_config.json"))
    os.replace(tmp_weights, os.path.join(adapter_dir, "adapter_model.safetensors"))


def generate_adapters(
    base_config: Mapping[str, Any] | str | os.PathLike,
    out_dir: str | os.PathLike,
    num_adapters: int,
    ranks: Sequence[int] = (8, 16, 32, 64),
    target_modules: Sequence[str] = SLICE_ORDER,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    seed: int = 0,
    name_prefix: str = "adapter",
    dtype: torch.dtype = torch.float32,
    *,
    rank_choice: str = "cycle",
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    output_scale: float = 0.25,
    overwrite: bool = True,
) -> list[GeneratedAdapter]:
    """Write ``num_adapters`` random PEFT LoRA adapters under ``out_dir``.

    Adapter ``i`` is ``out_dir/{name_prefix}-{i:04d}`` with rank ``ranks[i % len(ranks)]``
    (``rank_choice="cycle"``) or a seeded draw from ``ranks`` (``"random"``);
    ``lora_alpha=None`` means ``2 * r``. ``rank_pattern`` / ``alpha_pattern`` are written
    to every adapter's config (PEFT semantics). ``output_scale`` sets the LoRA delta's
    size relative to its input (see module docstring). Adapter ``i`` depends only on ``seed``,
    ``i`` and the settings, never on ``num_adapters``; an adapter whose files already
    hold the same settings is left untouched; one written with other settings is
    rewritten, or with ``overwrite=False`` FileExistsError is raised before anything is
    written. Returns (name, path, rank) per adapter.
    """
    if num_adapters < 0 or not ranks or rank_choice not in ("cycle", "random"):
        raise ValueError("need num_adapters >= 0, a non-empty ranks list and rank_choice 'cycle' or 'random'")
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got {list(ranks)}")
    if lora_alpha is not None and (not math.isfinite(lora_alpha) or lora_alpha == 0):
        raise ValueError(f"lora_alpha must be a finite number other than 0, got {lora_alpha}")
    unknown = [t for t in target_modules if t not in SLICE_ORDER]
    if unknown or not target_modules:
        raise ValueError(f"target_modules must be a non-empty subset of {SLICE_ORDER}, got {list(target_modules)}")
    hf_config = load_hf_config(base_config)
    base = BaseModelShape.from_hf_config(hf_config, dtype=dtype)
    # Where the base model lives is the most useful thing to record; a dict config
    # only knows the name it was saved under.
    if isinstance(base_config, Mapping):
        base_name = hf_config.get("_name_or_path")
    else:
        path = os.path.abspath(os.fspath(base_config))
        base_name = path if os.path.isdir(path) else os.path.dirname(path)
    out_dir = os.fspath(out_dir)
    rng = random.Random(seed)
    generated, to_write = [], []
    for i in range(num_adapters):
        rank = ranks[i % len(ranks)] if rank_choice == "cycle" else rng.choice(list(ranks))
        alpha = 2 * rank if lora_alpha is None else lora_alpha
        config = _adapter_config(base_name, rank, alpha, target_modules, use_rslora,
                                 rank_pattern or {}, alpha_pattern or {})
        adapter_seed = seed * 1_000_003 + i
        fingerprint = hashlib.sha256(json.dumps(
            [_GENERATOR_VERSION, config, adapter_seed, str(dtype), output_scale, base.__dict__ | {"dtype": ""}],
            sort_keys=True, default=str,
        ).encode()).hexdigest()
        name = f"{name_prefix}-{i:04d}"
        adapter_dir = os.path.join(out_dir, name)
        config_path = os.path.join(adapter_dir, "adapter_config.json")
        weights_path = os.path.join(adapter_dir, "adapter_model.safetensors")
        if not (os.path.isfile(config_path) and _existing_fingerprint(weights_path) == fingerprint):
            if not overwrite and os.path.isdir(adapter_dir) and os.listdir(adapter_dir):
                raise FileExistsError(f"{adapter_dir} already holds an adapter written with other settings")
            to_write.append((adapter_dir, config, adapter_seed, fingerprint))
        generated.append(GeneratedAdapter(name, adapter_dir, rank))
    for adapter_dir, config, adapter_seed, fingerprint in to_write:
        _write_adapter(adapter_dir, config, base, adapter_seed, dtype, output_scale, fingerprint)
    return generated


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: generate adapters for the model config given as CONFIG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="HF config.json or model directory")
    parser.add_argument("out_dir")
    parser.add_argument("-n", "--num-adapters", type=int, default=8)
    parser.add_argument("--ranks", default="8,16,32,64", help="comma-separated ranks")
    parser.add_argument("--rank-choice", choices=("cycle", "random"), default="cycle")
    parser.add_argument("--target-modules", default=",".join(SLICE_ORDER))
    parser.add_argument("--lora-alpha", type=float, default=None)
    parser.add_argument("--use-rslora", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name-prefix", default="adapter")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    try:
        adapters = generate_adapters(
            args.config, args.out_dir, args.num_adapters,
            ranks=[int(r) for r in args.ranks.split(",")],
            target_modules=args.target_modules.split(","),
            lora_alpha=args.lora_alpha, use_rslora=args.use_rslora, seed=args.seed,
            name_prefix=args.name_prefix, dtype=getattr(torch, args.dtype), rank_choice=args.rank_choice,
        )
    except (ValueError, OSError, KeyError) as e:  # bad values, unreadable or non-Llama config
        parser.error(f"{type(e).__name__}: {e}")
    for adapter in adapters:
        print(f"{adapter.name}\t{adapter.rank}\t{adapter.path}")


if __name__ == "__main__":
    main()
