"""`adapter_config.json`: parsed, checked, and matched against modules like PEFT does.

The matching rules mirror PEFT 0.21 so that rank and scaling per module are what PEFT
itself would build from the same file:

* `target_modules` as a list: a module matches an entry if its name equals the entry
  or ends with ``"." + entry``; `layers_to_transform` then keeps only the listed layer
  indexes (the index found with `layers_pattern`). As a string: the module name must
  `re.fullmatch` it. ``"all-linear"`` means every linear layer except the output head.
* `rank_pattern` / `alpha_pattern`: the first key ``k`` (in file order) for which
  ``re.match(rf"(.*\\.)?({k})$", module_name)`` succeeds gives the value; otherwise the
  global `r` / `lora_alpha` apply.
* scaling = alpha / r, or alpha / sqrt(r) with `use_rslora`.

A config is untrusted input, and a regex can take exponential time to match
(``"(.|.)*Q"``), so matching is bounded: each pattern is compiled once and at most
`MAX_PATTERN_CHARS` long; patterns made only of name characters and dots (what PEFT
writes for per-module ranks) run on `re`, where they cannot backtrack badly; any other
pattern runs on the `regex` package (same syntax and results for these patterns) with a
time limit, and all matching for one config shares `MATCH_BUDGET_S` seconds. Results
are memoized per module name, so a config costs (patterns x modules) matches once.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .errors import AdapterError
from .modules import SLICE_ORDER

ALL_LINEAR = "all-linear"

# PEFT's LoraConfig defaults, used when a key is absent from the file.
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8

# Bounds on untrusted configs (documented in README "Bad adapters").
MAX_PATTERN_CHARS = 1024  # one target_modules regex / pattern key / layers_pattern
MATCH_BUDGET_S = 1.0  # regex matching time for one config, all modules together
MAX_ABS_SCALING = 1e4  # |alpha / r| (or alpha / sqrt(r)) above this is refused

# A pattern of these characters has no quantifier, group, class or alternation of its
# own: wrapped in PEFT's templates, stdlib `re` matches it in O(len(name)^2) at worst.
_PLAIN = re.compile(r"[\w.\-/:]*")


class _PatternTooSlow(Exception):
    pass


class _Matcher:
    """One PEFT regex, compiled once, whose matching is bounded in time."""

    def __init__(self, pattern: str, user_part: str) -> None:
        self.compiled = re.compile(pattern)  # re.error: PEFT could not use it either
        self.bounded = None
        if not _PLAIN.fullmatch(user_part):
            try:
                import regex
            except ImportError:  # pragma: no cover - regex comes with transformers
                regex = None
            if regex is not None:
                self.bounded = regex.compile(pattern)

    def __call__(self, method: str, name: str, deadline: float):
        left = deadline - time.monotonic()
        if left <= 0:
            raise _PatternTooSlow
        if self.bounded is None:
            return getattr(self.compiled, method)(name)
        try:
            return getattr(self.bounded, method)(name, timeout=left)
        except TimeoutError:
            raise _PatternTooSlow from None


@lru_cache(maxsize=2048)
def _matcher(pattern: str, user_part: str) -> _Matcher:
    return _Matcher(pattern, user_part)


def _suffix_template(key: str) -> str:
    return rf"(.*\.)?({key})$"  # PEFT's get_pattern_key


def _layer_template(pattern: str) -> str:
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."  # PEFT's check_target_module_exists


_DEFAULT_LAYER = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")  # first numbered segment


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
    layers_pattern: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None
    adapter_name: str = field(default="", compare=False)
    # Per-module results and the matching time spent so far (see module docstring).
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def _match(self, what: str, user_part: str, pattern: str, method: str, module: str):
        # The budget counts time spent matching, so a spec kept for hours still answers.
        spent = self._memo.get("spent", 0.0)
        start = time.monotonic()
        try:
            return _matcher(pattern, user_part)(method, module, start + MATCH_BUDGET_S - spent)
        except _PatternTooSlow:
            raise AdapterError(
                self.adapter_name,
                f"{what} {user_part!r} takes too long to match module names (regex matching for one "
                f"adapter_config.json is limited to {MATCH_BUDGET_S:g} s; catastrophic backtracking?)",
            ) from None
        finally:
            self._memo["spent"] = spent + time.monotonic() - start

    def _memoized(self, kind: str, module: str, compute):
        key = (kind, module)
        if key not in self._memo:
            self._memo[key] = compute(module)
        return self._memo[key]

    def targets(self, module: str) -> bool:
        """Whether PEFT would put a LoRA on the module of this name."""
        return self._memoized("targets", module, self._targets)

    def _targets(self, module: str) -> bool:
        if isinstance(self.target_modules, str):
            t = self.target_modules
            return self._match("target_modules regex", t, t, "fullmatch", module) is not None
        if module in self.target_modules:
            return True
        found = any(module.endswith(f".{t}") for t in self.target_modules)
        if found and self.layers_to_transform is not None:
            return self._layer_index(module) in self.layers_to_transform
        return found

    def _layer_index(self, module: str) -> int | None:
        # Same first-numbered-segment rule as PEFT's check_target_module_exists.
        if not self.layers_pattern:
            match = _DEFAULT_LAYER.match(module)
        else:
            match = None
            for pattern in self.layers_pattern:
                match = self._match("layers_pattern", pattern, _layer_template(pattern), "match", module)
                if match:
                    break
        return int(match.group("idx")) if match else None

    def entry_matches(self, entry: str, module: str) -> bool:
        """Whether one list entry of `target_modules` names this module."""
        return module == entry or module.endswith(f".{entry}")

    def _pattern_key(self, what: str, pattern_keys, module: str) -> str | None:
        compiled = self._memo.get(("compiled", what))
        if compiled is None:
            compiled = [(key, _matcher(_suffix_template(key), key)) for key in pattern_keys]
            self._memo[("compiled", what)] = compiled
        start, before = time.monotonic(), self._memo.get("spent", 0.0)
        found = None
        for key, matcher in compiled:
            if matcher.bounded is None:  # plain: cannot backtrack badly, no timer per match
                if matcher.compiled.match(module):
                    found = key
                    break
            elif self._match(f"{what} key", key, _suffix_template(key), "match", module):
                found = key  # (bounded matches charged their own time)
                break
        self._charge(what, time.monotonic() - start - (self._memo.get("spent", 0.0) - before))
        return found

    def _charge(self, what: str, seconds: float) -> None:
        """Count plain-pattern matching time against the config's budget."""
        spent = self._memo.get("spent", 0.0) + seconds
        self._memo["spent"] = spent
        if spent > MATCH_BUDGET_S:
            raise AdapterError(
                self.adapter_name,
                f"{what} has too many patterns to match against module names (regex matching for one "
                f"adapter_config.json is limited to {MATCH_BUDGET_S:g} s)",
            )

    def rank_for(self, module: str) -> int:
        key = self._memoized("rank", module, lambda m: self._pattern_key("rank_pattern", self.rank_pattern, m))
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module: str) -> float:
        key = self._memoized("alpha", module, lambda m: self._pattern_key("alpha_pattern", self.alpha_pattern, m))
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


def _short(value: Any, limit: int = 80) -> str:
    """repr() of a config value, cut to ``limit`` characters for messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_regex(name: str, what: str, user_part: str, pattern: str) -> None:
    if len(user_part) > MAX_PATTERN_CHARS:
        raise AdapterError(name, f"{what} {_short(user_part)} is longer than {MAX_PATTERN_CHARS} characters")
    try:
        _matcher(pattern, user_part)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise AdapterError(name, f"{what} {_short(user_part)} is not a valid regex: {exc}") from None
    except Exception as exc:  # the regex package refusing what re accepts
        raise AdapterError(name, f"{what} {_short(user_part)} is not a supported regex: {exc}") from None


def _pattern_dict(name: str, what: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise AdapterError(name, f"{what} must be a JSON object mapping module-name patterns to values, "
                                 f"got {_short(value)}")
    return dict(value)


def _layers_to_transform(name: str, layers: Any) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise AdapterError(name, f"layers_to_transform must be a layer index or a list of them, got {_short(layers)}")
    return tuple(layers) or None  # PEFT treats an empty list like "all layers"


def _layers_pattern(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None or (isinstance(value, (str, list)) and not value):
        return None
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise AdapterError(name, f"layers_pattern must be a regex or a list of them, got {_short(value)}")
    for p in patterns:
        _check_regex(name, "layers_pattern", p, _layer_template(p))
    return tuple(patterns)


def parse_lora_config(adapter_name: str, config: Mapping[str, Any]) -> LoraHyperparams:
    """Check a PEFT config dict for features vllm-slora cannot serve and parse the rest.

    Raises AdapterError for: a non-LoRA PEFT type, DoRA, biases, modules_to_save, other
    unsupported PEFT extras, malformed ranks / alphas / target lists / patterns, and
    regexes that are invalid or too long. Messages keep stock vLLM's phrases ("does not
    yet support DoRA", "only supports modules_to_save being None", ...).
    """
    name = adapter_name
    if not isinstance(config, Mapping):
        raise AdapterError(name, "adapter_config.json must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(name, f"peft_type {_short(config.get('peft_type'))} is not supported, only LORA")
    if config.get("use_dora"):
        raise AdapterError(name, "vllm-slora, like vLLM, does not yet support DoRA (use_dora: true)")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterError(name, f"LoRA bias {_short(bias)} is not supported; only bias 'none' is")
    if config.get("modules_to_save"):
        raise AdapterError(
            name, f"modules_to_save {_short(config['modules_to_save'])} is not supported: vllm-slora only "
            "supports modules_to_save being None (fully trained extra modules would replace base weights)"
        )
    for extra in ("target_parameters", "trainable_token_indices", "layer_replication"):
        if config.get(extra):
            raise AdapterError(name, f"PEFT option {extra} is not supported")

    r = _positive_int(name, "r", config.get("r", PEFT_DEFAULT_R))
    alpha = _number(name, "lora_alpha", config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    rank_pattern = _pattern_dict(name, "rank_pattern", config.get("rank_pattern"))
    alpha_pattern = _pattern_dict(name, "alpha_pattern", config.get("alpha_pattern"))
    for key, value in rank_pattern.items():
        _positive_int(name, f"rank_pattern[{_short(key)}]", value)
        _check_regex(name, "rank_pattern key", key, _suffix_template(key))
    for key, value in alpha_pattern.items():
        _number(name, f"alpha_pattern[{_short(key)}]", value)
        _check_regex(name, "alpha_pattern key", key, _suffix_template(key))

    targets = config.get("target_modules")
    if targets is None:
        raise AdapterError(name, "adapter_config.json has no target_modules")
    if targets == ALL_LINEAR or targets == [ALL_LINEAR]:
        targets = SLICE_ORDER
    if isinstance(targets, str):
        _check_regex(name, "target_modules regex", targets, targets)
        parsed_targets: tuple[str, ...] | str = targets
    elif isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets):
        parsed_targets = tuple(targets)
    else:
        raise AdapterError(name, f"target_modules must be a non-empty list of names or a regex, got {_short(targets)}")

    base_name = config.get("base_model_name_or_path")
    return LoraHyperparams(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=parsed_targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layers_to_transform=_layers_to_transform(name, config.get("layers_to_transform")),
        layers_pattern=_layers_pattern(name, config.get("layers_pattern")),
        base_model_name_or_path=base_name if isinstance(base_name, str) else None,
        adapter_name=name,
    )
