"""A tiny random Llama with a locally trained tokenizer, built in seconds.

No model hub is reachable here; engine tests that do not need a real language model use
this. The weights are random but seeded, so every build is identical.
"""

from __future__ import annotations

from pathlib import Path

TINY_LLAMA = dict(
    # head_dim 32: the smallest head size vLLM's CPU attention supports.
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

def tiny_kv_block_bytes(block_size: int, num_layers: int | None = None) -> int:
    """Bytes of one KV-cache block id across every layer of the tiny model (fp32 K and V)."""
    head_dim = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
    layers = num_layers or TINY_LLAMA["num_hidden_layers"]
    return 2 * block_size * TINY_LLAMA["num_key_value_heads"] * head_dim * 4 * layers


_CORPUS = (
    "the quick brown fox jumps over the lazy dog . a stitch in time saves nine . "
    "paris is the capital of france . many adapters share one base model . "
    "unified paging keeps adapter weights and the kv cache in one pool . "
) * 20


def build_tiny_llama(target: Path, vocab_size: int = 512, seed: int = 0, num_layers: int | None = None) -> Path:
    """Write config, safetensors weights and tokenizer to `target` (idempotent); `num_layers`
    overrides TINY_LLAMA's 2 (tests of what is counted per layer)."""
    target = Path(target)
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.save_pretrained(target)

    torch.manual_seed(seed)
    shape = dict(TINY_LLAMA, num_hidden_layers=num_layers or TINY_LLAMA["num_hidden_layers"])
    config = LlamaConfig(
        vocab_size=len(fast), bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(target, safe_serialization=True)
    return target
