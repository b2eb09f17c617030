"""Packing tokenized examples into micro-batches by a token budget.

True packing: a micro-batch is one row of at most `batch_tokens` tokens holding whole
examples back to back, in data order (greedy: an example that does not fit starts the next
micro-batch; examples are never split, so each one attends only to itself and computes
exactly what it would alone, see forward.PackedLayout). No padding tokens are computed.

Targets are shifted per sequence: position i of an example predicts its token i + 1; the
last position of every example predicts nothing (IGNORE_INDEX), so no loss ever crosses
from one packed example into the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX, TrainingExample


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [T] int64
    targets: torch.Tensor  # [T] int64, next token of the same example or IGNORE_INDEX
    seq_lens: tuple[int, ...]  # lengths of the packed examples, summing to T
    lines: tuple[int, ...]  # source line of each packed example

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def shifted_targets(example: TrainingExample) -> list[int]:
    return example.labels[1:] + [IGNORE_INDEX]


def _batch(examples: Sequence[TrainingExample]) -> PackedBatch:
    ids = [t for e in examples for t in e.input_ids]
    targets = [t for e in examples for t in shifted_targets(e)]
    return PackedBatch(
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(targets, dtype=torch.int64),
        tuple(len(e) for e in examples),
        tuple(e.line for e in examples),
    )


def pack_examples(examples: Sequence[TrainingExample], batch_tokens: int) -> list[PackedBatch]:
    """Greedy packing in data order; every micro-batch holds at most `batch_tokens` tokens."""
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    batches: list[PackedBatch] = []
    current: list[TrainingExample] = []
    used = 0
    for example in examples:
        if len(example) > batch_tokens:
            raise ValueError(
                f"the example from line {example.line} has {len(example)} tokens, more than batch_tokens "
                f"{batch_tokens}; use max_length <= batch_tokens when loading the data"
            )
        if current and used + len(example) > batch_tokens:
            batches.append(_batch(current))
            current, used = [], 0
        current.append(example)
        used += len(example)
    if current:
        batches.append(_batch(current))
    return batches


def save_batches(batches: Sequence[PackedBatch], path) -> None:
    """Write packed micro-batches for the engine's trainer (torch.save of plain tensors and tuples)."""
    torch.save([{"input_ids": b.input_ids, "targets": b.targets, "seq_lens": list(b.seq_lens),
                 "lines": list(b.lines)} for b in batches], path)


def load_batches(path) -> list[PackedBatch]:
    raw = torch.load(path, weights_only=True)
    return [PackedBatch(b["input_ids"], b["targets"], tuple(b["seq_lens"]), tuple(b["lines"])) for b in raw]
