"""The `slora` section of vLLM's `additional_config`, parsed and validated.

Activation is one flag: `--additional-config '{"slora": {...}}'` (or
`LLM(..., additional_config={"slora": {...}})`). Every key is checked here, before the
engine starts, so a typo or a nonsense value stops start-up with an error that names the
key and what it accepts. Imports nothing from vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

SLORA_KEY = "slora"

KERNEL_BACKENDS = ("auto", "native", "torch", "triton")
MAX_FINETUNE_SLACK = 10.0  # training may add at most 10x the inference step time


def slack_problem(value: object) -> str | None:
    """Why `value` is not a valid co-serving slack (config key and runtime setting alike), or None."""
    if type(value) not in (int, float) or not 0.0 <= value <= MAX_FINETUNE_SLACK:  # NaN fails the range too
        return (f"must be a number in [0, {MAX_FINETUNE_SLACK:g}] (the share of the inference step time "
                f"training may add), got {value!r}")
    return None


def coserve_settings_problem(settings: Mapping[str, Any]) -> tuple[str, str] | None:
    """(the setting, why) when `settings` cannot be applied while serving (POST
    /v1/fine_tuning/coserve; the planner's `configure`), or None."""
    unknown = sorted(set(settings) - {"slack"})
    if unknown:
        return unknown[0], f"unknown co-serving setting(s) {', '.join(map(repr, unknown))}; known: 'slack'"
    if "slack" in settings and (problem := slack_problem(settings["slack"])):
        return "slack", f"'slack' {problem}"
    return None


class SLoRAConfigError(ValueError):
    """A bad `slora` section in additional_config."""


@dataclass(frozen=True)
class SLoRAConfig:
    # Bytes of packed adapters each worker keeps in host memory (LRU) so that a
    # re-admitted adapter is copied into the pool without touching the disk.
    host_cache_mb: int = 2048
    # How many requests at the head of the waiting queue get their adapters made
    # resident ahead of time.
    prefetch_depth: int = 8
    # Pickle-based `adapter_model.bin` can run code when loaded; refused unless allowed.
    allow_pickle_adapters: bool = False
    # Which LoRA compute path the workers use: "auto" = Triton on CUDA, the native
    # C++ kernel on CPU (the torch path where it was not built); see paged/backends.py.
    kernel_backend: str = "auto"
    # Directories the OpenAI server looks in for an adapter named by a request's `model`
    # that is not loaded yet: `<dir>/<model>` (first directory that has it), validated
    # and loaded on first use. JSON gives a list; kept as a tuple (hashable).
    adapter_dirs: tuple[str, ...] = ()
    # Training inside the engine (#10) on vLLM's own base weights. On the CPU backend it
    # keeps the dense linear weights that vLLM drops after repacking them for its GEMM
    # kernels: a second copy of every linear weight (~405 MiB fp32 for the 135M default
    # model), hence opt-in (patches/patch_cpu_gemm.py).
    finetune: bool = False
    # Co-serving budget: training may add this share of the inference step time, on
    # average (0 = train only while the engine has no inference at all). The mean step
    # grows by about this share and the p99 by at least as much, so the default stays
    # under the +10 % p99 the project aims for (#10); operators raise it while serving.
    finetune_slack: float = 0.05
    # With no inference, one engine step runs training units for about this long, so a
    # request arriving meanwhile waits at most about one such step.
    finetune_idle_step_ms: int = 100
    # Memory all jobs' passes together may use to keep layer graphs from forward to
    # backward (no recompute: ~25 % less work); a layer beyond it keeps only its boundary
    # and backward recomputes it. CPU: borrowed from the pool while the KV cache can spare
    # it and called back under KV pressure (pool/training_loan.py); GPU: kept out of the
    # KV cache at start (finetune/memory.py).
    finetune_activation_mb: int = 1024
    # Jobs that train at once in the engine; more wait (queued) until one ends. The memory
    # kept out of the KV cache at start grows with it: each job's LoRA + AdamW state and
    # one micro-batch's layer boundaries (finetune/memory.py).
    finetune_max_jobs: int = 2

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> SLoRAConfig | None:
        """None when the plugin is not enabled for this engine."""
        if not additional_config or SLORA_KEY not in additional_config:
            return None
        return cls.from_dict(additional_config[SLORA_KEY])

    @classmethod
    def from_dict(cls, raw: Any) -> SLoRAConfig:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise SLoRAConfigError(
                f"additional_config['slora'] must be a JSON object (dict), got {type(raw).__name__}: {raw!r}"
            )
        allowed = {f.name: f for f in fields(cls)}
        for key in raw:
            if key not in allowed:
                raise SLoRAConfigError(
                    f"unknown slora config key {key!r}; allowed keys: {', '.join(sorted(allowed))}"
                )
        values = {}
        for key, value in raw.items():
            if key == "adapter_dirs":
                values[key] = _directories(value)
                continue
            expected = type(allowed[key].default)
            if expected is float and type(value) is int:
                value = float(value)  # JSON 1 for 1.0
            # bool is a subclass of int: reject True where a count is expected and 1
            # where a flag is expected.
            if type(value) is not expected:
                raise SLoRAConfigError(
                    f"slora config key {key!r} must be of type {expected.__name__}, "
                    f"got {type(value).__name__}: {value!r}"
                )
            values[key] = value
        config = cls(**values)
        config._check_ranges()
        return config

    def _check_ranges(self) -> None:
        if self.host_cache_mb < 1:
            raise SLoRAConfigError(
                f"slora config key 'host_cache_mb' must be a positive number of MiB, got {self.host_cache_mb}"
            )
        if self.prefetch_depth < 0:
            raise SLoRAConfigError(
                f"slora config key 'prefetch_depth' must be >= 0, got {self.prefetch_depth}"
            )
        if problem := slack_problem(self.finetune_slack):
            raise SLoRAConfigError(f"slora config key 'finetune_slack' {problem}")
        if self.finetune_activation_mb < 0:
            raise SLoRAConfigError(
                f"slora config key 'finetune_activation_mb' must be >= 0, got {self.finetune_activation_mb}"
            )
        if self.finetune_max_jobs < 1:
            raise SLoRAConfigError(
                f"slora config key 'finetune_max_jobs' must be >= 1, got {self.finetune_max_jobs}"
            )
        if self.finetune_idle_step_ms < 1:
            raise SLoRAConfigError(
                f"slora config key 'finetune_idle_step_ms' must be >= 1, got {self.finetune_idle_step_ms}"
            )
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise SLoRAConfigError(
                f"slora config key 'kernel_backend' must be one of {', '.join(KERNEL_BACKENDS)}, "
                f"got {self.kernel_backend!r}"
            )


def _directories(value: Any) -> tuple[str, ...]:
    """`adapter_dirs`: a JSON list of non-empty path strings."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise SLoRAConfigError(
            "slora config key 'adapter_dirs' must be a list of directory paths (non-empty strings), "
            f"got {type(value).__name__}: {value!r}"
        )
    return tuple(value)
