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


def _poison(value: float):
    def breaker(path: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path / WEIGHTS))
        tensors[POISONED][0, 0] = value
        save_file(tensors, str(path / WEIGHTS))

    return breaker


def _symlink_elsewhere(path: Path) -> None:
    """The weight file is a symlink to a file outside the adapter (here /etc/passwd)."""
    (path / WEIGHTS).unlink()
    target = Path("/etc/passwd")
    if not target.is_file():
        target = path.parent / "not-a-checkpoint"
        target.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 40)
    (path / WEIGHTS).symlink_to(target)


def _corrupt_header_entry(path: Path) -> None:
    data = (path / WEIGHTS).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = ["0", "8"]
    raw = json.dumps(header).encode()
    (path / WEIGHTS).write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


POISONED = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"

BREAKERS = {
    "missing_weights": (lambda p: (p / WEIGHTS).unlink(), f"no {WEIGHTS}"),
    "truncated": (_truncate, "truncated"),
    "corrupt": (_corrupt, "header"),
    "dora": (lambda p: _edit_config(p, use_dora=True), "does not yet support DoRA"),
    "modules_to_save": (lambda p: _edit_config(p, modules_to_save=["lm_head"]),
                        "only supports modules_to_save being None"),
    "unsupported_target": (
        lambda p: _edit_config(p, target_modules=["q_proj", "embed_tokens"]), "unsupported target module"
    ),
    "pickle_only": (_pickle_only, "pickle"),
    # Issue 9 C: regexes that backtrack exponentially are refused in bounded time.
    "catastrophic_regex": (lambda p: _edit_config(p, target_modules="(.|.)*[0-9]{3}"), "takes too long"),
    # Issue 9 E: malformed values are adapter errors, never bare Python ones or a 500.
    "invalid_layers_pattern": (lambda p: _edit_config(p, layers_pattern="layers(", layers_to_transform=[0]),
                               "layers_pattern 'layers(' is not a valid regex"),
    "rank_pattern_wrong_type": (lambda p: _edit_config(p, rank_pattern=["q_proj", 8]),
                                "rank_pattern must be a JSON object"),
    "alpha_pattern_wrong_type": (lambda p: _edit_config(p, alpha_pattern="q_proj=8"),
                                 "alpha_pattern must be a JSON object"),
    "corrupt_header_entry": (_corrupt_header_entry, "malformed header entry"),
    "symlink_elsewhere": (_symlink_elsewhere, "corrupt or truncated"),
    # Issue 9 D: NaN / Inf weights and absurd scalings.
    "nan_weights": (_poison(float("nan")), f"tensor {POISONED} holds NaN or Inf values"),
    "inf_weights": (_poison(float("inf")), f"tensor {POISONED} holds NaN or Inf values"),
    "absurd_scaling": (lambda p: _edit_config(p, lora_alpha=1e9), "is outside [-10000, 10000]"),
    # Issue 9 item 9: no adapter at the path is 404 with stock's phrase, whether or not
    # the path exists (nothing is revealed about the server's files).
    "not_found": (lambda p: shutil.rmtree(p), "No adapter found for"),
    "not_an_adapter_dir": (lambda p: (p / "adapter_config.json").unlink(), "No adapter found for"),
}

# HTTP status of each case (stock vLLM's codes); 400 when not listed.
STATUS = {"not_found": 404, "not_an_adapter_dir": 404}


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
        "rank_above_max": (Path(too_big.path), "LoRA rank 128 is greater than max_lora_rank 64"),
        "wrong_shapes": (Path(wrong.path), "has shape"),
    }
