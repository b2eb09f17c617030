"""Broken copies of a valid adapter, one per kind of bad input, for engine tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# case -> (how to break a copy, text the error must contain)
WEIGHTS = "adapter_model.safetensors"


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _truncate(path: Path) -> None:
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])


def _corrupt(path: Path) -> None:
    (path / WEIGHTS).write_bytes(b"\x13\x37" * 64)


def _pickle_only(path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(path / WEIGHTS)), path / "adapter_model.bin")
    (path / WEIGHTS).unlink()


BREAKERS = {
    "missing_weights": (lambda p: (p / WEIGHTS).unlink(), f"no {WEIGHTS}"),
    "truncated": (_truncate, "truncated"),
    "corrupt": (_corrupt, "header"),
    "dora": (lambda p: _edit_config(p, use_dora=True), "DoRA"),
    "modules_to_save": (lambda p: _edit_config(p, modules_to_save=["lm_head"]), "modules_to_save"),
    "unsupported_target": (
        lambda p: _edit_config(p, target_modules=["q_proj", "embed_tokens"]), "unsupported target module"
    ),
    "pickle_only": (_pickle_only, "pickle"),
}


def make_bad_adapters(good: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """case -> (adapter dir, expected message fragment)."""
    out = {}
    for case, (breaker, needle) in BREAKERS.items():
        path = root / f"bad-{case}"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(good, path)
        breaker(path)
        out[case] = (path, needle)
    return out


def make_model_bad_adapters(model_config: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Cases that need the base model: rank above --max-lora-rank 64, another model's shapes."""
    from vllm_slora.adapters.generate import generate_adapters

    (too_big,) = generate_adapters(model_config, root, 1, ranks=(128,), name_prefix="rank128")
    other_base = dict(
        model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=30,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
    )
    (wrong,) = generate_adapters(other_base, root, 1, ranks=(8,), name_prefix="othermodel")
    return {
        "rank_above_max": (Path(too_big.path), "above max_lora_rank 64"),
        "wrong_shapes": (Path(wrong.path), "has shape"),
    }
