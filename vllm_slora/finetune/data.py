"""Training data: JSONL lines -> token ids + labels (loss mask), with errors that name the line.

One JSON object per line, in one of three formats:

* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's
  chat template; loss on the assistant turns only (each turn's text as the template
  renders it, end-of-turn marker included, so the model learns to stop). Found by
  rendering the conversation up to each assistant turn (with the generation prompt) and
  through it: the characters in between are the turn, and a token is trained when it
  starts inside one. The whole conversation is tokenized once, as inference sees it.
* ``{"prompt": ..., "completion": ...}``: prompt tokens (with the tokenizer's special
  tokens, e.g. BOS) + completion tokens + EOS; loss on the completion and EOS only.
* ``{"text": ...}``: the text's tokens (with special tokens) + EOS; loss on all tokens.

Decisions:
* **One format per file.** Mixing formats is refused at the first line whose format
  differs from the first example's: it almost always means two files were concatenated
  by mistake, and the loss masks would silently mean different things.
* **Too long sequences are refused by default** (error naming the line, its length and
  the limit): truncating a chat can cut off every assistant token, or train the model to
  stop mid-answer without EOS. ``truncate=True`` keeps the first `max_length` tokens
  instead, and still refuses a line left with nothing to train on.
* Blank lines are skipped (line numbers still count them); extra keys are ignored.
* A line with nothing to train on (no assistant turn, empty completion or text) is refused.

Labels follow the HF convention: ``labels[i]`` is token i itself where token i is a loss
token, ``IGNORE_INDEX`` (-100) elsewhere; position i predicts token i + 1 (see packing.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Label of a token that is not trained on (PyTorch's cross_entropy default ignore_index).
IGNORE_INDEX = -100
MESSAGES, PROMPT_COMPLETION, TEXT = "messages", "prompt/completion", "text"
_EXPECTED = '{"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}'


class TrainingDataError(ValueError):
    """A problem with training data; names the source, the line (1-based) and the problem."""

    def __init__(self, source: str, line: int | None, problem: str) -> None:
        self.source, self.line, self.problem = source, line, problem
        where = f"{source}, line {line}" if line is not None else source
        super().__init__(f"training data {where}: {problem}")

    def __reduce__(self):
        return type(self), (self.source, self.line, self.problem)


@dataclass
class TrainingExample:
    line: int  # where it came from, for errors later on
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where there is no loss

    @property
    def num_loss_tokens(self) -> int:
        """Tokens that are predicted and trained on (token 0 has nothing to predict it)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line; errors name the line."""
    source = os.fspath(path)
    records = []
    with open(source, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TrainingDataError(source, number, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                records.append((number, json.loads(text)))
            except json.JSONDecodeError as e:
                raise TrainingDataError(
                    source, number, f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object (JSONL)"
                ) from None
    if not records:
        raise TrainingDataError(source, None, "the file is empty: no training examples")
    return records


def record_format(record: Any, source: str, line: int) -> str:
    """Which of the three formats a parsed line is in (or an error saying what is wrong)."""
    if not isinstance(record, Mapping):
        raise TrainingDataError(source, line, f"expected a JSON object ({_EXPECTED}), got a JSON {_json_type(record)}")
    found = [key for key in ("messages", "prompt", "completion", "text") if key in record]
    formats = {MESSAGES if k == "messages" else TEXT if k == "text" else PROMPT_COMPLETION for k in found}
    if len(formats) > 1:
        raise TrainingDataError(source, line, f"ambiguous line: it has keys of several formats ({', '.join(found)}); expected {_EXPECTED}")
    if not formats:
        keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        raise TrainingDataError(source, line, f"expected {_EXPECTED}; the object has keys {keys}")
    fmt = formats.pop()
    if fmt == PROMPT_COMPLETION and ("prompt" not in record or "completion" not in record):
        present, missing = ("prompt", "completion") if "prompt" in record else ("completion", "prompt")
        raise TrainingDataError(source, line, f"has {present!r} but no {missing!r}")
    return fmt


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _string(record: Mapping, key: str, source: str, line: int, allow_empty: bool) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise TrainingDataError(source, line, f"{key!r} must be a string, got a JSON {_json_type(value)}")
    if not allow_empty and not value:
        raise TrainingDataError(source, line, f"{key!r} is empty: nothing to train on")
    return value


def _check_messages(messages: Any, source: str, line: int) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError(source, line, "'messages' must be a non-empty array of {\"role\": ..., \"content\": ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TrainingDataError(source, line, f"messages[{i}] must be an object, got a JSON {_json_type(message)}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise TrainingDataError(source, line, f"messages[{i}] has no string {key!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise TrainingDataError(source, line, "no assistant message: nothing to train on (loss is on assistant turns only)")
    return [dict(m) for m in messages]


def _special_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _text_example(record: Mapping, tokenizer, source: str, line: int) -> TrainingExample:
    ids = _with_eos(tokenizer, _special_ids(tokenizer, _string(record, "text", source, line, allow_empty=False)))
    return TrainingExample(line, ids, list(ids))


def _prompt_completion_example(record: Mapping, tokenizer, source: str, line: int) -> TrainingExample:
    prompt = _string(record, "prompt", source, line, allow_empty=True)
    completion = _string(record, "completion", source, line, allow_empty=False)
    # Tokenized apart so the loss boundary falls exactly between prompt and completion.
    prompt_ids = _special_ids(tokenizer, prompt)
    completion_ids = _with_eos(tokenizer, list(tokenizer(completion, add_special_tokens=False)["input_ids"]))
    return TrainingExample(line, prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def _render(tokenizer, messages: list[dict], generation_prompt: bool, source: str, line: int) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # template errors are jinja exceptions of many kinds
        raise TrainingDataError(source, line, f"the chat template failed to render the messages: {e}") from None
    if not isinstance(text, str):
        raise TrainingDataError(source, line, "the chat template did not render to a string")
    return text


def _chat_example(record: Mapping, tokenizer, source: str, line: int) -> TrainingExample:
    messages = _check_messages(record["messages"], source, line)
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingDataError(source, line, "the tokenizer has no chat template, which 'messages' lines need")
    full = _render(tokenizer, messages, False, source, line)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, source, line)
        through = _render(tokenizer, messages[: i + 1], False, source, line)
        if not (full.startswith(before) and full.startswith(through) and len(through) >= len(before)):
            raise TrainingDataError(
                source, line, f"cannot locate assistant message {i}: the chat template does not render a "
                "conversation's beginning as a prefix of the whole (assistant-only loss needs that)"
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
        for token, offset in zip(ids, encoded["offset_mapping"])
    ]
    return TrainingExample(line, ids, labels)


_BUILDERS = {MESSAGES: _chat_example, PROMPT_COMPLETION: _prompt_completion_example, TEXT: _text_example}


def examples_from_records(
    records: Iterable[tuple[int, Any]],
    tokenizer,
    max_length: int,
    truncate: bool = False,
    source: str = "<records>",
) -> list[TrainingExample]:
    """Tokenize (line number, parsed JSON) records; see the module docstring for the rules."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    examples: list[TrainingExample] = []
    first_format: tuple[str, int] | None = None
    for line, record in records:
        fmt = record_format(record, source, line)
        if first_format is None:
            first_format = (fmt, line)
        elif fmt != first_format[0]:
            raise TrainingDataError(
                source, line, f"{fmt} format, but line {first_format[1]} is in {first_format[0]} format "
                "(one format per file: split the file or convert the lines)"
            )
        example = _BUILDERS[fmt](record, tokenizer, source, line)
        if len(example) > max_length:
            if not truncate:
                raise TrainingDataError(
                    source, line, f"{len(example)} tokens, longer than max_length {max_length} "
                    "(shorten the example, raise max_length, or allow truncation)"
                )
            example = TrainingExample(line, example.input_ids[:max_length], example.labels[:max_length])
        if example.num_loss_tokens == 0:
            reason = " after truncation to max_length" if truncate and len(example) == max_length else ""
            raise TrainingDataError(source, line, f"no tokens to train on{reason}")
        examples.append(example)
    if first_format is None:
        raise TrainingDataError(source, None, "no training examples")
    return examples


def load_training_file(
    path: str | os.PathLike, tokenizer, max_length: int, truncate: bool = False
) -> list[TrainingExample]:
    """Read and tokenize a JSONL training file (see the module docstring for formats and rules)."""
    return examples_from_records(read_jsonl(path), tokenizer, max_length, truncate, source=os.fspath(path))
