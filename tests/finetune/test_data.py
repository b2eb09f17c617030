"""Training data: loss masks of the three JSONL formats, packing, and errors that name the line."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

from vllm_slora.finetune.data import IGNORE_INDEX, TrainingDataError, TrainingExample, load_training_file
from vllm_slora.finetune.packing import pack_examples

CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
SIMPLE_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def chat_tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


def write_jsonl(tmp_path, lines, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def trained_runs(example: TrainingExample) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for label in example.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def test_text_trains_on_every_token(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path, [{"text": "the quick brown fox"}])
    (example,) = load_training_file(path, tiny_tokenizer, max_length=64)
    expected = tiny_tokenizer("the quick brown fox")["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert example.input_ids == expected
    assert example.labels == expected
    assert example.num_loss_tokens == len(expected) - 1  # token 0 has no predictor


def test_prompt_completion_trains_on_completion_and_eos_only(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path, [{"prompt": "paris is the capital of", "completion": " france ."}])
    (example,) = load_training_file(path, tiny_tokenizer, max_length=64)
    prompt_ids = tiny_tokenizer("paris is the capital of")["input_ids"]
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    trained = example.labels[len(prompt_ids) :]
    assert trained == example.input_ids[len(prompt_ids) :]
    assert trained[-1] == tiny_tokenizer.eos_token_id
    assert trained[:-1] == tiny_tokenizer(" france .", add_special_tokens=False)["input_ids"]


def test_chat_trains_on_assistant_turns_only(tmp_path, chat_tokenizer):
    """Default model's tokenizer and template: the ids are the template's own tokenization and
    exactly the assistant turns (content + end-of-turn) are trained."""
    path = write_jsonl(tmp_path, [{"messages": CHAT}])
    (example,) = load_training_file(path, chat_tokenizer, max_length=256)
    templated = chat_tokenizer.apply_chat_template(CHAT, tokenize=True)
    templated = templated["input_ids"] if isinstance(templated, Mapping) else templated
    assert example.input_ids == list(templated)
    runs = trained_runs(example)
    assert [chat_tokenizer.decode(run) for run in runs] == ["Hello! How can I help?<|im_end|>\n", "Paris.<|im_end|>\n"]
    # Everything else (system prompt, user turns, role headers) is masked.
    masked = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]
    text = chat_tokenizer.decode(masked)
    assert "Hi there" in text and "Capital of France?" in text and "Paris" not in text


def test_chat_with_custom_template_and_without_one(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path, [{"messages": CHAT[:2]}])
    with pytest.raises(TrainingDataError, match="no chat template") as info:
        load_training_file(path, tiny_tokenizer, max_length=256)
    assert info.value.line == 1
    tiny_tokenizer.chat_template = SIMPLE_TEMPLATE
    try:
        (example,) = load_training_file(path, tiny_tokenizer, max_length=256)
    finally:
        tiny_tokenizer.chat_template = None
    (run,) = trained_runs(example)
    from tokenizers import decoders

    tiny_tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()  # the tiny one is built without
    assert tiny_tokenizer.decode(run) == "Hello! How can I help?</s>"


def test_blank_lines_are_skipped_but_counted(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path, [{"text": "a stitch"}, "", "   ", {"text": "in time"}])
    examples = load_training_file(path, tiny_tokenizer, max_length=64)
    assert [e.line for e in examples] == [1, 4]


BAD_LINES = {
    "not_json": ([{"text": "ok"}, '{"text": "unterminated'], 2, "not valid JSON"),
    "json_array_file": (["[", '  {"text": "a"}', "]"], 1, "not valid JSON"),
    "array_line": ([[1, 2, 3]], 1, "expected a JSON object"),
    "wrong_keys": ([{"input": "x", "output": "y"}], 1, "the object has keys 'input', 'output'"),
    "prompt_without_completion": ([{"prompt": "x", "complition": "y"}], 1, "has 'prompt' but no 'completion'"),
    "text_not_string": ([{"text": 5}], 1, "'text' must be a string, got a JSON number"),
    "empty_text": ([{"text": ""}], 1, "'text' is empty"),
    "empty_completion": ([{"prompt": "x", "completion": ""}], 1, "'completion' is empty"),
    "ambiguous": ([{"text": "x", "messages": CHAT}], 1, "ambiguous line"),
    "messages_not_list": ([{"messages": "hi"}], 1, "non-empty array"),
    "message_without_content": ([{"messages": [{"role": "user"}]}], 1, "messages[0] has no string 'content'"),
    "no_assistant": ([{"messages": [{"role": "user", "content": "hi"}]}], 1, "no assistant message"),
    "mixed_formats": (
        [{"text": "a"}, {"text": "b"}, {"prompt": "c", "completion": "d"}], 3,
        "prompt/completion format, but line 1 is in text format",
    ),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_lines_name_line_and_problem(tmp_path, tiny_tokenizer, case):
    lines, line, problem = BAD_LINES[case]
    path = write_jsonl(tmp_path, lines)
    with pytest.raises(TrainingDataError) as info:
        load_training_file(path, tiny_tokenizer, max_length=64)
    assert info.value.line == line
    assert problem in str(info.value)
    assert f"{path}, line {line}:" in str(info.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank_lines"])
def test_empty_file(tmp_path, tiny_tokenizer, content):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(TrainingDataError, match="empty: no training examples") as info:
        load_training_file(path, tiny_tokenizer, max_length=64)
    assert info.value.line is None


def test_non_utf8_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(TrainingDataError, match="not UTF-8") as info:
        load_training_file(path, tiny_tokenizer, max_length=64)
    assert info.value.line == 2


def test_too_long_is_refused_by_default_and_truncated_on_request(tmp_path, tiny_tokenizer):
    long_text = "the quick brown fox jumps over the lazy dog . " * 4
    path = write_jsonl(tmp_path, [{"text": "short"}, {"text": long_text}])
    with pytest.raises(TrainingDataError, match="longer than max_length 16") as info:
        load_training_file(path, tiny_tokenizer, max_length=16)
    assert info.value.line == 2
    examples = load_training_file(path, tiny_tokenizer, max_length=16, truncate=True)
    assert len(examples[1]) == 16
    assert examples[1].input_ids == tiny_tokenizer(long_text)["input_ids"][:16]  # the beginning is kept


def test_truncation_that_leaves_nothing_to_train_on_is_refused(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path, [{"prompt": "the quick brown fox jumps over the lazy dog", "completion": " ok"}])
    with pytest.raises(TrainingDataError, match="no tokens to train on after truncation") as info:
        load_training_file(path, tiny_tokenizer, max_length=4, truncate=True)
    assert info.value.line == 1


def test_packing_keeps_order_budget_and_per_sequence_targets():
    examples = [
        TrainingExample(1, [10, 11, 12], [10, 11, 12]),
        TrainingExample(2, [20, 21, 22, 23], [IGNORE_INDEX, IGNORE_INDEX, 22, 23]),
        TrainingExample(3, [30, 31], [30, 31]),
        TrainingExample(4, [40, 41, 42, 43, 44], [40, 41, 42, 43, 44]),
    ]
    batches = pack_examples(examples, batch_tokens=9)
    assert [b.lines for b in batches] == [(1, 2, 3), (4,)]
    first = batches[0]
    assert first.seq_lens == (3, 4, 2)
    assert first.input_ids.tolist() == [10, 11, 12, 20, 21, 22, 23, 30, 31]
    # Next token of the same sequence; nothing crosses into the next sequence.
    assert first.targets.tolist() == [11, 12, -100, -100, 22, 23, -100, 31, -100]
    assert first.num_loss_tokens == 5 == sum(e.num_loss_tokens for e in examples[:3])
    with pytest.raises(ValueError, match="line 4 has 5 tokens, more than batch_tokens 4"):
        pack_examples(examples, batch_tokens=4)


def test_examples_per_step_are_split_into_micro_batches_and_saved_as_steps(tmp_path):
    """batch_size examples per step, packed into batch_tokens micro-batches (a step never takes
    examples of the next); the steps survive the file round trip, and a file of single
    micro-batches (save_batches, or one written before steps were saved) reads as one step each."""
    import torch

    from vllm_slora.finetune.packing import load_batches, load_steps, save_batches, save_steps, step_micro_batches

    examples = [TrainingExample(i + 1, [i] * n, [i] * n) for i, n in enumerate((3, 4, 2, 5, 4))]
    steps = step_micro_batches(examples, 3, batch_tokens=5)
    assert [[b.lines for b in step] for step in steps] == [[(1,), (2,), (3,)], [(4,), (5,)]]
    assert [[b.lines for b in step] for step in step_micro_batches(examples, None, 9)] == [[(1, 2, 3)], [(4, 5)]]
    save_steps(steps, tmp_path / "steps.pt")
    again = load_steps(tmp_path / "steps.pt")
    assert [[b.lines for b in step] for step in again] == [[b.lines for b in step] for step in steps]
    assert all(torch.equal(a.input_ids, b.input_ids) for sa, sb in zip(again, steps) for a, b in zip(sa, sb))
    assert [b.lines for b in load_batches(tmp_path / "steps.pt")] == [(1,), (2,), (3,), (4,), (5,)]
    flat = pack_examples(examples, batch_tokens=9)
    save_batches(flat, tmp_path / "flat.pt")
    assert [[b.lines for b in step] for step in load_steps(tmp_path / "flat.pt")] == [[b.lines] for b in flat]
    legacy = [{"input_ids": b.input_ids, "targets": b.targets, "seq_lens": list(b.seq_lens), "lines": list(b.lines)}
              for b in flat]  # no "step" key
    torch.save(legacy, tmp_path / "legacy.pt")
    assert [[b.lines for b in step] for step in load_steps(tmp_path / "legacy.pt")] == [[b.lines] for b in flat]
