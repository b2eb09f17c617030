"""LoRA parameters: PEFT-like init, and PEFT files written and read (checked by PEFT itself)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.finetune.peft_reference import load_hf, relative_error
from tests.finetune.training_cases import TARGET_SETS, random_lora
from vllm_slora.finetune.base_weights import base_weights_from_hf
from vllm_slora.finetune.forward import forward_logits
from vllm_slora.finetune.lora_params import LoraParams, LoraSettings
from vllm_slora.finetune.model_config import DecoderConfig


def tiny_config(tiny_model) -> DecoderConfig:
    return DecoderConfig.from_hf(tiny_model)


def test_init_is_peft_default_and_seeded(tiny_model):
    config = tiny_config(tiny_model)
    settings = LoraSettings(r=8, alpha=16.0, target_modules=("q_proj", "down_proj"))
    lora = LoraParams.init(config, settings, seed=5)
    assert set(lora.modules) == {(layer, p) for layer in range(config.num_layers) for p in ("q_proj", "down_proj")}
    for (_, projection), module in lora.modules.items():
        in_features, out_features = config.features(projection)
        assert module.a.shape == (8, in_features) and module.b.shape == (out_features, 8)
        assert torch.count_nonzero(module.b) == 0  # training starts exactly at the base model
        # kaiming_uniform(a=sqrt(5)) on [r, in] draws from U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1 / math.sqrt(in_features)
        largest = float(module.a.detach().abs().max())
        assert 0.9 * bound < largest <= bound
        assert module.scaling == 2.0 and module.a.requires_grad
    again = LoraParams.init(config, settings, seed=5)
    other = LoraParams.init(config, settings, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(lora.parameters(), again.parameters()))
    assert not torch.equal(lora.parameters()[0], other.parameters()[0])
    assert LoraSettings(r=4, alpha=8.0, use_rslora=True).scaling == 4.0


def test_settings_are_checked():
    with pytest.raises(ValueError, match="subset"):
        LoraSettings(target_modules=("lm_head",))
    with pytest.raises(ValueError, match="positive"):
        LoraSettings(r=0)
    assert LoraSettings(target_modules=("v_proj", "q_proj")).target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize("case", ["all7", "v_only", "rslora"])
def test_written_adapter_loads_in_peft_with_the_same_logits(tiny_model, tmp_path, case):
    from peft import PeftModel

    config = tiny_config(tiny_model)
    lora = random_lora(config, seed=3, **TARGET_SETS[case])
    out = lora.save_peft(tmp_path / "adapter", base_model_name_or_path=str(tiny_model))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight" in lora.peft_state_dict()

    base_model = load_hf(tiny_model)
    base = base_weights_from_hf(base_model)
    ids = torch.randint(0, config.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = forward_logits(base, lora, ids)
        peft = PeftModel.from_pretrained(base_model, str(out))
        ref = peft(input_ids=ids[None]).logits[0]
    assert relative_error(ours, ref) < 1e-5
    assert relative_error(ours, forward_logits(base, None, ids)) > 1e-3  # the adapter does something


def test_peft_adapter_read_back_with_rank_and_alpha_patterns(tiny_model, tmp_path):
    """An adapter PEFT wrote (per-module ranks/alphas, some layers only) trains on from the same values,
    and writing it again gives files PEFT loads to the same logits."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = tiny_config(tiny_model)
    torch.manual_seed(0)
    peft_config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "o_proj"], layers_to_transform=[1],
        rank_pattern={"up_proj": 2}, alpha_pattern={"o_proj": 3}, init_lora_weights=False,
    )
    written = get_peft_model(load_hf(tiny_model), peft_config)
    written.save_pretrained(tmp_path / "peft")

    lora = LoraParams.from_peft_dir(tmp_path / "peft", config)
    assert set(lora.modules) == {(1, "q_proj"), (1, "o_proj"), (1, "up_proj")}
    assert lora.modules[1, "up_proj"].rank == 2 and lora.modules[1, "up_proj"].scaling == 4.0
    assert lora.modules[1, "o_proj"].scaling == 0.75

    resaved = lora.save_peft(tmp_path / "again")
    saved_config = json.loads((resaved / "adapter_config.json").read_text())
    assert saved_config["rank_pattern"] == {"model.layers.1.mlp.up_proj": 2}

    base_model = load_hf(tiny_model)
    base = base_weights_from_hf(base_model)
    ids = torch.randint(0, config.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = written(input_ids=ids[None]).logits[0]
        ours = forward_logits(base, lora, ids)
        reloaded = PeftModel.from_pretrained(base_model, str(resaved))(input_ids=ids[None]).logits[0]
    assert relative_error(ours, ref) < 1e-5
    assert relative_error(reloaded, ref) < 1e-5
