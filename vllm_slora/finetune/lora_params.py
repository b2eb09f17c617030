"""The trainable LoRA parameters: created like PEFT, read from and written to PEFT files.

One `LoraModule` per targeted (layer, projection), with PEFT's semantics:
``delta(x) = (dropout(x) @ A^T) @ B^T * scaling``, A: [r, in], B: [out, r],
scaling = alpha / r, or alpha / sqrt(r) with rsLoRA. The projections are named as in HF
Llama (q/k/v/o/gate/up/down_proj); the training forward adds each delta to its slice of
vLLM's fused qkv / gate_up output.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters.modules import SLICE_ORDER, module_name
from .model_config import DecoderConfig

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def peft_key(layer: int, projection: str, matrix: str) -> str:
    """PEFT's state-dict key, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return f"base_model.model.{module_name(layer, projection)}.lora_{matrix}.weight"


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = SLICE_ORDER
    use_rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.r, int) and self.r > 0):
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        unknown = [t for t in self.target_modules if t not in SLICE_ORDER]
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules must be a non-empty subset of {SLICE_ORDER}, got {self.target_modules!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        # Keep the fixed projection order whatever order the caller listed them in.
        object.__setattr__(self, "target_modules", tuple(p for p in SLICE_ORDER if p in self.target_modules))

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)


@dataclass
class LoraModule:
    a: nn.Parameter  # [r, in_features]
    b: nn.Parameter  # [out_features, r]
    alpha: float
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


class LoraParams:
    """All LoRA modules of one adapter, keyed by (layer, projection)."""

    def __init__(self, config: DecoderConfig, settings: LoraSettings, modules: dict[tuple[int, str], LoraModule]):
        self.config = config
        self.settings = settings
        self.modules = dict(sorted(modules.items(), key=lambda kv: (kv[0][0], SLICE_ORDER.index(kv[0][1]))))
        self._by_layer: list[dict[str, LoraModule]] = [{} for _ in range(config.num_layers)]
        for (layer, projection), module in self.modules.items():
            self._by_layer[layer][projection] = module

    @classmethod
    def init(
        cls, config: DecoderConfig, settings: LoraSettings, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> LoraParams:
        """PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so training starts at the base model.

        Seeded by its own generator (layer by layer, projections in fixed order), so the
        same seed gives the same adapter whatever else uses the global RNG.
        """
        generator = torch.Generator().manual_seed(seed)
        modules = {}
        for layer in range(config.num_layers):
            for projection in settings.target_modules:
                in_features, out_features = config.features(projection)
                a = torch.empty(settings.r, in_features, dtype=dtype)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                b = torch.zeros(out_features, settings.r, dtype=dtype)
                modules[layer, projection] = LoraModule(nn.Parameter(a), nn.Parameter(b), settings.alpha, settings.scaling)
        return cls(config, settings, modules)

    @classmethod
    def from_peft_dir(
        cls, adapter_dir: str | os.PathLike, config: DecoderConfig, dtype: torch.dtype = torch.float32
    ) -> LoraParams:
        """Continue training an existing PEFT LoRA adapter (per-module ranks/alphas kept)."""
        from safetensors.torch import load_file

        from ..adapters.peft_config import parse_lora_config

        adapter_dir = Path(adapter_dir)
        raw = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
        hyper = parse_lora_config(adapter_dir.name, raw)  # refuses DoRA, biases, modules_to_save, ...
        tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS_NAME))
        modules = {}
        for layer in range(config.num_layers):
            for projection in SLICE_ORDER:
                name = module_name(layer, projection)
                if not hyper.targets(name):
                    continue
                a_key, b_key = peft_key(layer, projection, "A"), peft_key(layer, projection, "B")
                if a_key not in tensors or b_key not in tensors:
                    raise ValueError(f"{adapter_dir}: adapter_config.json targets {name} but the weights lack {a_key} / {b_key}")
                rank, alpha = hyper.rank_for(name), hyper.alpha_for(name)
                in_features, out_features = config.features(projection)
                a, b = tensors[a_key], tensors[b_key]
                if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
                    raise ValueError(
                        f"{adapter_dir}: {name} has A {tuple(a.shape)} / B {tuple(b.shape)}, expected "
                        f"({rank}, {in_features}) / ({out_features}, {rank}) for this base model"
                    )
                modules[layer, projection] = LoraModule(
                    nn.Parameter(a.to(dtype).clone()),
                    nn.Parameter(b.to(dtype).clone()),
                    alpha,
                    lora_scaling(rank, alpha, hyper.use_rslora),
                )
        if not modules:
            raise ValueError(f"{adapter_dir}: the adapter targets none of the Llama projections")
        targets = tuple(p for p in SLICE_ORDER if any(proj == p for _, proj in modules))
        settings = LoraSettings(
            r=hyper.r, alpha=hyper.lora_alpha, target_modules=targets, use_rslora=hyper.use_rslora,
            dropout=float(raw.get("lora_dropout") or 0.0),
        )
        return cls(config, settings, modules)

    def layer(self, index: int) -> dict[str, LoraModule]:
        """projection name -> LoraModule for one decoder layer (untargeted ones absent)."""
        return self._by_layer[index]

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(PEFT key, parameter), layer by layer, projections in fixed order, A before B."""
        for (layer, projection), module in self.modules.items():
            yield peft_key(layer, projection, "A"), module.a
            yield peft_key(layer, projection, "B"), module.b

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        """The adapter_config.json that makes PEFT rebuild exactly these modules."""
        s = self.settings
        projections = [p for p in SLICE_ORDER if any(proj == p for _, proj in self.modules)]
        full_grid = len(self.modules) == self.config.num_layers * len(projections)
        # A partial grid (some layers without some projection) is written as full module
        # names, which PEFT matches exactly (a list entry equal to the module name).
        targets: Sequence[str] = projections if full_grid else [module_name(lay, p) for lay, p in self.modules]
        rank_pattern = {module_name(lay, p): m.rank for (lay, p), m in self.modules.items() if m.rank != s.r}
        alpha_pattern = {module_name(lay, p): m.alpha for (lay, p), m in self.modules.items() if m.alpha != s.alpha}
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": s.r,
            "lora_alpha": s.alpha,
            "lora_dropout": s.dropout,
            "target_modules": list(targets),
            "use_rslora": s.use_rslora,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_dora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
        }

    def peft_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {k: p.detach().to(dtype or p.dtype).contiguous().clone() for k, p in self.named_parameters()}

    def save_peft(
        self, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write adapter_config.json + adapter_model.safetensors (PeftModel.from_pretrained loads them).

        Files are written under temporary names and renamed, so a reader never sees half an adapter.
        `tensors`: this adapter's `peft_state_dict(dtype)` when the caller already made it.
        """
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp_weights = out / f".{ADAPTER_WEIGHTS_NAME}.tmp"
        save_file(self.peft_state_dict(dtype) if tensors is None else tensors, str(tmp_weights), metadata={"format": "pt"})
        tmp_config = out / f".{ADAPTER_CONFIG_NAME}.tmp"
        tmp_config.write_text(json.dumps(self.peft_config(base_model_name_or_path), indent=2))
        os.replace(tmp_weights, out / ADAPTER_WEIGHTS_NAME)
        os.replace(tmp_config, out / ADAPTER_CONFIG_NAME)
        return out
