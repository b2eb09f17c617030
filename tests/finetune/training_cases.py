"""Shared inputs of the finetuning tests: LoRA target sets, random adapters, packed examples."""

from __future__ import annotations

import json

import torch

from vllm_slora.finetune.data import IGNORE_INDEX, TrainingExample
from vllm_slora.finetune.lora_params import LoraParams, LoraSettings
from vllm_slora.finetune.model_config import DecoderConfig

TARGET_SETS = {
    "all7": dict(target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "attention": dict(target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    "v_only": dict(target_modules=("v_proj",)),
    "rslora": dict(target_modules=("q_proj", "v_proj", "down_proj"), use_rslora=True),
}

# Short sentences the training-file tests (trainer, OpenAI fine-tuning API) build examples from.
SENTENCES = [
    "the quick brown fox jumps over the lazy dog .",
    "a stitch in time saves nine .",
    "paris is the capital of france .",
    "many adapters share one base model .",
    "unified paging keeps adapter weights and the kv cache in one pool .",
    "the lazy dog sleeps .",
]


def random_lora(config: DecoderConfig, seed: int = 0, **settings) -> LoraParams:
    """PEFT init, then B made non-zero too: with B = 0 the A gradients would all be 0."""
    lora = LoraParams.init(config, LoraSettings(r=4, alpha=8.0, **settings), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in lora.modules.values():
            module.b.copy_(torch.randn(module.b.shape, generator=generator) * 0.05)
    return lora


def packed_examples(vocab: int, lengths=(9, 17, 5), seed: int = 3) -> list[TrainingExample]:
    """Sequences of different lengths with partial loss masks (a masked prefix, like a prompt)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        masked = min(i + 2, n - 2)
        examples.append(TrainingExample(i + 1, ids, [IGNORE_INDEX] * masked + ids[masked:]))
    return examples


def write_training_file(path):
    """SENTENCES as JSONL: even lines prompt/completion (cut in half), odd lines completion only."""
    lines = []
    for i, sentence in enumerate(SENTENCES):
        words = sentence.split(" ")
        cut = len(words) // 2
        if i % 2 == 0:
            lines.append({"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])})
        else:
            lines.append({"prompt": "", "completion": sentence})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
