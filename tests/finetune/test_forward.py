"""The functional training forward against HF transformers + PEFT: logits and LoRA gradients."""

from __future__ import annotations

import pytest
import torch

from tests.finetune.peft_reference import (
    hf_micro_batch_loss,
    load_hf,
    peft_lora_tensors,
    peft_model_like,
    relative_error,
)
from tests.finetune.training_cases import TARGET_SETS, packed_examples, random_lora
from vllm_slora.finetune.base_weights import base_weights_from_hf
from vllm_slora.finetune.forward import forward_logits
from vllm_slora.finetune.loss import packed_loss
from vllm_slora.finetune.model_config import DecoderConfig
from vllm_slora.finetune.packing import pack_examples

# Packed sequence lengths: different (attention per sequence) and equal (one batched call).
LENGTHS = {"mixed-lengths": (9, 17, 5), "equal-lengths": (12, 12, 12)}


@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("case", list(TARGET_SETS))
def test_logits_match_hf_peft(tiny_model, case, lengths):
    """Packed forward logits (3 sequences in one row) == HF+PEFT on each sequence alone."""
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    lora = random_lora(config, **TARGET_SETS[case])
    peft = peft_model_like(hf, lora)
    base = base_weights_from_hf(peft)
    examples = packed_examples(config.vocab_size, lengths=LENGTHS[lengths])
    batch = pack_examples(examples, batch_tokens=64)[0]
    assert batch.seq_lens == LENGTHS[lengths]
    with torch.no_grad():
        ours = forward_logits(base, lora, batch.input_ids, batch.seq_lens)
        start = 0
        for example in examples:
            ref = peft(input_ids=torch.tensor([example.input_ids])).logits[0]
            assert relative_error(ours[start : start + len(example)], ref) < 1e-5
            start += len(example)


@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("case", list(TARGET_SETS))
def test_lora_gradients_match_hf_peft(tiny_model, case, lengths):
    """Every LoRA A/B gradient of one packed micro-batch == PEFT's for the same token-mean loss."""
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    lora = random_lora(config, seed=7, **TARGET_SETS[case])
    peft = peft_model_like(hf, lora)
    base = base_weights_from_hf(peft)
    examples = packed_examples(config.vocab_size, lengths=LENGTHS[lengths])
    batch = pack_examples(examples, batch_tokens=64)[0]
    assert batch.seq_lens == LENGTHS[lengths]

    ours = packed_loss(base, lora, batch.input_ids, batch.seq_lens, batch.targets)
    ours.backward()
    ref = hf_micro_batch_loss(peft, examples)
    ref.backward()
    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())

    ref_params = peft_lora_tensors(peft, lora)
    for key, param in lora.named_parameters():
        assert param.grad is not None and ref_params[key].grad is not None, key
        assert float(ref_params[key].grad.abs().max()) > 0, key  # the comparison is not vacuous
        assert relative_error(param.grad, ref_params[key].grad) < 1e-5, key


def test_activation_checkpointing_changes_nothing(tiny_model):
    """checkpoint_layers=True: same loss and the same gradients as without."""
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    base = base_weights_from_hf(hf)
    batch = pack_examples(packed_examples(config.vocab_size), batch_tokens=64)[0]
    grads = []
    for checkpointing in (False, True):
        lora = random_lora(config, seed=11)
        loss = packed_loss(base, lora, batch.input_ids, batch.seq_lens, batch.targets, checkpoint_layers=checkpointing)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in lora.parameters()]))
    (loss_plain, plain), (loss_ckpt, ckpt) = grads
    assert abs(loss_plain - loss_ckpt) <= 1e-6 * abs(loss_plain)
    for a, b in zip(plain, ckpt):
        assert relative_error(b, a) < 1e-5


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0},
        {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ],
    ids=["linear", "llama3"],
)
def test_scaled_rope_matches_hf(rope):
    """RoPE scaling variants (rope_parameters) == HF's implementation, on positions beyond the original window."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_model import TINY_LLAMA

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=97, rope_parameters=rope, **TINY_LLAMA)).eval()
    base = base_weights_from_hf(hf)
    assert base.config.rope.rope_type == rope["rope_type"]
    ids = torch.randint(0, 97, (150,))
    with torch.no_grad():
        assert relative_error(forward_logits(base, None, ids), hf(input_ids=ids[None]).logits[0]) < 1e-5


def test_hf_views_share_storage_and_stay_frozen(tiny_model):
    """No copies of base weights except the fused qkv / gate_up a HF model cannot provide."""
    hf = load_hf(tiny_model)
    base = base_weights_from_hf(hf)
    layer = hf.model.layers[0]
    assert base.embed_tokens.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert base.layers[0].o.data_ptr() == layer.self_attn.o_proj.weight.data_ptr()
    assert base.layers[0].down.data_ptr() == layer.mlp.down_proj.weight.data_ptr()
    assert base.layers[0].input_norm.data_ptr() == layer.input_layernorm.weight.data_ptr()
    assert all(not t.requires_grad for _, t in base.named_tensors())
    base.check_usable_for_training()


def test_inference_mode_weights_are_refused(tiny_model):
    """Tensors made under inference_mode cannot be saved for backward: refused with a clear error.

    Documents the PyTorch rule the design relies on: an inference tensor can be read under
    autograd only where nothing saves it, and every base weight is saved (dX = dY @ W).
    """
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    with torch.inference_mode():
        base = base_weights_from_hf(hf)
    assert base.layers[0].qkv.is_inference()
    with pytest.raises(ValueError, match="inference_mode"):
        base.check_usable_for_training()
    lora = random_lora(config)
    batch = pack_examples(packed_examples(config.vocab_size), batch_tokens=64)[0]
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        packed_loss(base, lora, batch.input_ids, batch.seq_lens, batch.targets).backward()


def test_bfloat16_base_trains_float32_lora(tiny_model):
    """A bf16 base (what GPUs serve) with fp32 LoRA master weights: runs, grads are fp32, loss near fp32's."""
    hf = load_hf(tiny_model)
    config = DecoderConfig.from_hf(hf.config)
    batch = pack_examples(packed_examples(config.vocab_size), batch_tokens=64)[0]
    losses = []
    for model in (hf, load_hf(tiny_model).to(torch.bfloat16)):
        lora = random_lora(config, seed=1)
        loss = packed_loss(base_weights_from_hf(model), lora, batch.input_ids, batch.seq_lens, batch.targets)
        loss.backward()
        assert loss.dtype == torch.float32
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora.parameters())
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) < 2e-2 * losses[0]
