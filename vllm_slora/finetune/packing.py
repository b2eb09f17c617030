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


def step_micro_batches(examples: Sequence[TrainingExample], examples_per_step: int | None,
                       batch_tokens: int) -> list[list[PackedBatch]]:
    """The optimizer steps of an epoch, each a list of micro-batches of at most `batch_tokens`
    tokens: one packed micro-batch per step (`examples_per_step` None), or that many
    examples per step, packed into as many micro-batches as they need (their gradients are
    accumulated into one step: memory stays that of one micro-batch, whatever the step's size)."""
    if examples_per_step is not None and (isinstance(examples_per_step, bool) or not isinstance(examples_per_step, int)
                                          or examples_per_step < 1):
        raise ValueError(f"batch_size must be a positive integer (examples per step), got {examples_per_step!r}")
    if examples_per_step is None:
        return [[batch] for batch in pack_examples(examples, batch_tokens)]
    return [pack_examples(examples[i:i + examples_per_step], batch_tokens)
            for i in range(0, len(examples), examples_per_step)]


def step_totals(step: PackedBatch | Sequence[PackedBatch]) -> tuple[int, int, tuple[int, ...]]:
    """(tokens, loss tokens, source lines) of one optimizer step's micro-batches."""
    batches = [step] if isinstance(step, PackedBatch) else list(step)
    return (sum(b.num_tokens for b in batches), sum(b.num_loss_tokens for b in batches),
            tuple(line for b in batches for line in b.lines))


def save_steps(steps: Sequence[Sequence[PackedBatch]], path) -> None:
    """Write an epoch's optimizer steps of packed micro-batches for the engine's trainer
    (torch.save of plain tensors and lists; each micro-batch names its step)."""
    torch.save([{"input_ids": b.input_ids, "targets": b.targets, "seq_lens": list(b.seq_lens),
                 "lines": list(b.lines), "step": index} for index, step in enumerate(steps) for b in step], path)


def load_steps(path) -> list[list[PackedBatch]]:
    """The steps `save_steps` wrote (a file of `save_batches`: one micro-batch per step)."""
    steps: list[list[PackedBatch]] = []
    last = None
    for index, b in enumerate(torch.load(path, weights_only=True)):
        batch = PackedBatch(b["input_ids"], b["targets"], tuple(b["seq_lens"]), tuple(b["lines"]))
        step = b.get("step", ("own", index))
        if steps and step == last:
            steps[-1].append(batch)
        else:
            steps.append([batch])
        last = step
    return steps


def save_batches(batches: Sequence[PackedBatch], path) -> None:
    """Write packed micro-batches, one optimizer step each."""
    save_steps([[b] for b in batches], path)


def load_batches(path) -> list[PackedBatch]:
    """Every micro-batch of a `save_steps` / `save_batches` file, in order."""
    return [batch for step in load_steps(path) for batch in step]
