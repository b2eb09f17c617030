"""What the scheduler tells every worker about adapters, once per step.

The scheduler (EngineCore process) owns residency: which adapters hold which pool
blocks. Each step it sends an `SLoRAStepPlan` inside `SLoRASchedulerOutput` (a
`SchedulerOutput` subclass with one extra field, pickled to every TP rank as is).
Block ids are the same on every rank; each rank fills its own pages with its own shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AdapterPlacement:
    """One adapter and the pool blocks its weights occupy."""

    lora_int_id: int
    lora_name: str
    lora_path: str
    # Bumped when an adapter is re-registered under the same name (load_inplace); a
    # worker must refill pages and drop host-cache entries of older versions.
    version: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class AdapterSource:
    """Where a worker reads an adapter from (no blocks: it is not resident yet)."""

    lora_name: str
    lora_path: str
    version: int


@dataclass
class SLoRAStepPlan:
    # Adapters whose pages must be filled before this step's forward (newly allocated,
    # or reclaimed and re-allocated since they were last filled).
    load: list[AdapterPlacement] = field(default_factory=list)
    # Adapters whose blocks were handed to someone else since the previous plan: their
    # pages no longer hold their weights.
    evicted: list[int] = field(default_factory=list)
    # Adapters of requests near the head of the waiting queue: workers read and pack them
    # into their host cache in the background, so the step that later loads them into
    # pages does not wait on the disk.
    warm: list[AdapterSource] = field(default_factory=list)
