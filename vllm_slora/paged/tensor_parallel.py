"""The tensor-parallel group a worker's paged LoRA layers talk to.

The layers need only the group's size, this worker's rank and two collectives; they get
them through this object (built from vLLM's communication ops in compat), so the layer
code imports no vLLM module and tests can drive it with fakes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class TPGroup:
    size: int = 1
    rank: int = 0
    # Concatenate every rank's tensor along the last dim (rank order).
    all_gather_last: Callable[[torch.Tensor], torch.Tensor] = _identity
    # Elementwise sum over ranks; every rank gets the result.
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity
    # Every rank's picklable object, in rank order (host side, for rare agreements).
    all_gather_object: Callable[[object], list] = lambda obj: [obj]


SINGLE = TPGroup()
