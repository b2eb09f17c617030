"""`adapter_config.json`: parsed, checked, and matched against modules like PEFT does.

The matching rules mirror PEFT 0.21 so that rank and scaling per module are what PEFT
itself would build from the same file:

* `target_modules` as a list: a module matches an entry if its name equals the entry
  or ends with ``"." + entry``; `layers_to_transform` then keeps only the listed layer
  indexes. As a string: the module name must `re.fullmatch` it. ``"all-linear"`` means
  every linear layer except the output head.
* `rank_pattern` / `alpha_pattern`: the first key ``k`` (in file order) for which
  ``re.match(rf"(.*\\.)?({k})$", module_name)`` succeeds gives the value; otherwise the
  global `r` / `lora_alpha` apply.
* scaling = alpha / r, or alpha / sqrt(r) with `use_rslora`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import AdapterError
from .modules import SLICE_ORDER

ALL_LINEAR = "all-linear"

# PEFT's LoraConfig defaults, used when a key is absent from the file.
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8


def _pattern_key(pattern_keys, module: str) -> str | None:
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _layer_index(module: str, layers_pattern: Any) -> int | None:
    # Same first-numbered-segment rule as PEFT's check_target_module_exists.
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match:
                break
    return int(match.group("idx")) if match else None


@dataclass(frozen=True)
class LoraHyperparams:
    """The parts of a PEFT LoRA config that decide which modules get what rank and scale."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: Any = None
    base_model_name_or_path: str | None = None

    def targets(self, module: str) -> bool:
        """Whether PEFT would put a LoRA on the module of this name."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        if module in self.target_modules:
            return True
        found = any(module.endswith(f".{t}") for t in self.target_modules)
        if found and self.layers_to_transform is not None:
            return _layer_index(module, self.layers_pattern) in self.layers_to_transform
        return found

    def entry_matches(self, entry: str, module: str) -> bool:
        """Whether one list entry of `target_modules` names this module."""
        return module == entry or module.endswith(f".{entry}")

    def rank_for(self, module: str) -> int:
        key = _pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, module: str) -> float:
        rank, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _positive_int(name: str, what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterError(name, f"{what} must be a positive integer, got {value!r}")
    return value


def _number(name: str, what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(name, f"{what} must be a finite number, got {value!r}")
    return value


def parse_lora_config(adapter_name: str, config: Mapping[str, Any]) -> LoraHyperparams:
    """Check a PEFT config dict for features vllm-slora cannot serve and parse the rest.

    Raises AdapterError for: a non-LoRA PEFT type, DoRA, biases, modules_to_save, other
    unsupported PEFT extras, and malformed ranks / alphas / target lists.
    """
    name = adapter_name
    if not isinstance(config, Mapping):
        raise AdapterError(name, "adapter_config.json must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(name, f"peft_type {config.get('peft_type')!r} is not supported, only LORA")
    if config.get("use_dora"):
        raise AdapterError(name, "DoRA adapters (use_dora: true) are not supported")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterError(name, f"LoRA bias {bias!r} is not supported; only bias 'none' is")
    if config.get("modules_to_save"):
        raise AdapterError(
            name, f"modules_to_save {config['modules_to_save']!r} is not supported (fully trained "
            "extra modules would replace base weights)"
        )
    for extra in ("target_parameters", "trainable_token_indices", "layer_replication"):
        if config.get(extra):
            raise AdapterError(name, f"PEFT option {extra} is not supported")

    r = _positive_int(name, "r", config.get("r", PEFT_DEFAULT_R))
    alpha = _number(name, "lora_alpha", config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    for key, value in rank_pattern.items():
        _positive_int(name, f"rank_pattern[{key!r}]", value)
    for key, value in alpha_pattern.items():
        _number(name, f"alpha_pattern[{key!r}]", value)
    for key in (*rank_pattern, *alpha_pattern):
        try:
            re.compile(key)
        except re.error as exc:
            raise AdapterError(name, f"rank/alpha pattern key {key!r} is not a valid regex: {exc}") from None

    targets = config.get("target_modules")
    if targets is None:
        raise AdapterError(name, "adapter_config.json has no target_modules")
    if targets == ALL_LINEAR or targets == [ALL_LINEAR]:
        targets = SLICE_ORDER
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise AdapterError(name, f"target_modules regex {targets!r} is invalid: {exc}") from None
        parsed_targets: tuple[str, ...] | str = targets
    elif isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets):
        parsed_targets = tuple(targets)
    else:
        raise AdapterError(name, f"target_modules must be a non-empty list of names or a regex, got {targets!r}")

    layers = config.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and layers):
        layers = None  # PEFT treats an empty list like "all layers"
    return LoraHyperparams(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=parsed_targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layers_to_transform=tuple(layers) if layers else None,
        layers_pattern=config.get("layers_pattern"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )
