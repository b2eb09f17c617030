"""A random tiny Llama with a locally trained tokenizer, for end-to-end tests.

No model hub is reachable, and the embedded SmolLM2 takes long to start on CPU; this model
builds in about a second and vLLM serves it like any Hugging Face checkpoint. Its outputs
are noise, which is all a serving test needs. Adapters for it come from
`vllm_slora.adapters.generate.generate_adapters(model_dir, ...)` like for any model.
"""

from __future__ import annotations

from pathlib import Path

from vllm_slora.bench.prompt_words import PROMPT_WORDS

TINY_LLAMA_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    # Set explicitly: hidden/heads would be 16, and vLLM's CPU attention kernels refuse
    # head_dim 16 ("Unsupported CPU attention configuration"); 32 is the smallest they take.
    head_dim=32,
    intermediate_size=128,
)


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Sentences made of the benchmark's prompt words, so prompts tokenize to about one
    # token per word, as they do with real tokenizers.
    corpus = [" ".join(PROMPT_WORDS[i:] + PROMPT_WORDS[:i]) for i in range(len(PROMPT_WORDS))]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_tiny_llama(out_dir: str | Path, vocab_size: int = 1024, seed: int = 0) -> Path:
    """Write a random LlamaForCausalLM plus tokenizer into `out_dir`; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = _train_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **TINY_LLAMA_SHAPE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir

