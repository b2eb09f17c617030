"""Frozen base weights in vLLM's layout, as the training forward reads them.

vLLM fuses q/k/v into one `qkv_proj` weight (rows: q, then k, then v) and gate/up into
`gate_up_proj` (rows: gate, then up). The training forward reads exactly that layout, so
inside the engine it runs on vLLM's loaded parameters by reference: no copy, no second
model in memory (research/flexllm.md §4.1).

Three sources:
* `base_weights_from_vllm(model)`: views of a vLLM `LlamaForCausalLM`'s parameters;
* `base_weights_from_hf(model)`: a HF `LlamaForCausalLM` (fusing needs a `torch.cat`,
  a copy; meant for tests and the offline path);
* `base_weights_from_checkpoint(model_dir)`: HF safetensors files, fused on load,
  without vLLM or a HF model object (offline finetuning).

Tensors made under `torch.inference_mode()` cannot join autograd: a base weight is saved
for the backward of every matmul whose input needs a gradient, and PyTorch refuses to
save inference tensors ("Inference tensors cannot be saved for backward"). vLLM loads its
weights outside inference mode, so this never bites; `check_usable_for_training` makes
sure and refuses rather than silently cloning a whole model.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .model_config import DecoderConfig


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    o: torch.Tensor  # [hidden, q_size]
    post_attention_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


@dataclass
class BaseWeights:
    config: DecoderConfig
    embed_tokens: torch.Tensor  # [vocab, hidden] (a view without vLLM's vocab padding)
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the same tensor as embed_tokens when tied

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield "embed_tokens", self.embed_tokens
        for i, layer in enumerate(self.layers):
            for name, tensor in vars(layer).items():
                yield f"layers.{i}.{name}", tensor
        yield "norm", self.norm
        yield "lm_head", self.lm_head

    def check_usable_for_training(self) -> None:
        """Refuse tensors autograd cannot use as constants, or that would get gradients."""
        config = self.config
        expected_qkv = (config.q_size + 2 * config.kv_size, config.hidden_size)
        for name, tensor in self.named_tensors():
            if tensor.is_inference():
                raise ValueError(
                    f"base weight {name} was created under torch.inference_mode(); autograd cannot "
                    "save it for backward. Load the model outside inference mode (vLLM does)."
                )
            if tensor.requires_grad:
                raise ValueError(f"base weight {name} requires grad; base weights must stay frozen (detach them)")
        for i, layer in enumerate(self.layers):
            if tuple(layer.qkv.shape) != expected_qkv:
                raise ValueError(
                    f"layers.{i}.qkv has shape {tuple(layer.qkv.shape)}, expected {expected_qkv} "
                    "(tensor-parallel shards are not supported by the training forward yet)"
                )


def _config_of(model) -> DecoderConfig:
    return DecoderConfig.from_hf(model.config)


def _named_layers(
    config: DecoderConfig,
    get: Callable[[str], torch.Tensor],
    qkv: Callable[[str], torch.Tensor],
    gate_up: Callable[[str], torch.Tensor],
) -> list[LayerWeights]:
    """The decoder layers of a source addressed by HF/vLLM parameter names.

    `get(name)` returns one tensor by its full name; `qkv(prefix)` and `gate_up(prefix)`
    return the fused weights of the layer named by `prefix` (`model.layers.{i}`): a fused
    parameter as is (vLLM) or a `torch.cat` of the separate projections (HF checkpoints).
    """
    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        layers.append(
            LayerWeights(
                input_norm=get(f"{p}.input_layernorm.weight"),
                qkv=qkv(p),
                o=get(f"{p}.self_attn.o_proj.weight"),
                post_attention_norm=get(f"{p}.post_attention_layernorm.weight"),
                gate_up=gate_up(p),
                down=get(f"{p}.mlp.down_proj.weight"),
            )
        )
    return layers


@torch.no_grad()
def base_weights_from_hf(model) -> BaseWeights:
    """vLLM-layout weights of a HF `LlamaForCausalLM` (or a PEFT model wrapping one).

    Every weight is a detached view of the HF parameter except the fused qkv / gate_up,
    which `torch.cat` has to build (HF keeps the projections separate).
    """
    config = _config_of(model)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model

    def weight(module) -> torch.Tensor:
        # A PEFT-wrapped projection keeps the frozen linear in `base_layer`.
        return getattr(module, "base_layer", module).weight.detach()

    layers = []
    for block in hf.model.layers:
        attn, mlp = block.self_attn, block.mlp
        layers.append(
            LayerWeights(
                input_norm=block.input_layernorm.weight.detach(),
                qkv=torch.cat([weight(attn.q_proj), weight(attn.k_proj), weight(attn.v_proj)]),
                o=weight(attn.o_proj),
                post_attention_norm=block.post_attention_layernorm.weight.detach(),
                gate_up=torch.cat([weight(mlp.gate_proj), weight(mlp.up_proj)]),
                down=weight(mlp.down_proj),
            )
        )
    embed = hf.model.embed_tokens.weight.detach()
    head = hf.lm_head.weight
    lm_head = embed if head is hf.model.embed_tokens.weight else head.detach()
    return BaseWeights(config, embed, layers, hf.model.norm.weight.detach(), lm_head)


def base_weights_from_vllm(model) -> BaseWeights:
    """Views of a vLLM `LlamaForCausalLM`'s parameters (tensor parallel size 1).

    Every tensor is a detached view of the vLLM parameter (same storage, no copy).
    Parameter names as in vllm/model_executor/models/llama.py: `model.embed_tokens.weight`,
    `model.layers.{i}.self_attn.qkv_proj.weight`, `...o_proj.weight`,
    `model.layers.{i}.mlp.gate_up_proj.weight`, `...down_proj.weight`, the two layer norms,
    `model.norm.weight` and `lm_head.weight` (the embedding itself when tied). A projection
    wrapped by a LoRA layer (vLLM's or vllm-slora's) keeps its weight in `base_layer`.
    vLLM pads the vocabulary rows of the embedding and head to a multiple of 64; the views
    cut the padding off.
    """
    config = _config_of(model)
    # remove_duplicate=False: a tied lm_head is listed under its own name too.
    params = dict(model.named_parameters(remove_duplicate=False))

    def get(name: str) -> torch.Tensor:
        for candidate in (name, name.replace(".weight", ".base_layer.weight")):
            if candidate in params:
                # detach: a view without autograd history (vLLM's norm weights are plain
                # nn.Parameters with requires_grad=True; the view shares their storage).
                tensor = params[candidate].detach()
                if tensor.numel() == 0:
                    raise ValueError(
                        f"vLLM parameter {candidate} is empty: vLLM's CPU backend repacks linear weights "
                        "for its GEMM kernels and drops the dense tensor (dispatch_cpu_unquantized_gemm with "
                        "remove_weight=True), which a training forward cannot read; GPU backends keep it. "
                        "Training on the CPU backend needs the dense weights kept."
                    )
                return tensor
        raise KeyError(f"vLLM model has no parameter {name!r} (is it a Llama-style model?)")

    layers = _named_layers(
        config,
        get,
        qkv=lambda p: get(f"{p}.self_attn.qkv_proj.weight"),
        gate_up=lambda p: get(f"{p}.mlp.gate_up_proj.weight"),
    )
    vocab = config.vocab_size
    embed = get("model.embed_tokens.weight")
    head = model.lm_head.weight.detach() if "lm_head.weight" not in params else get("lm_head.weight")
    weights = BaseWeights(config, embed[:vocab], layers, get("model.norm.weight"), head[:vocab])
    if head.data_ptr() == embed.data_ptr():
        weights.lm_head = weights.embed_tokens
    weights.check_usable_for_training()
    return weights


@torch.no_grad()
def base_weights_from_checkpoint(model_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> BaseWeights:
    """Read a HF Llama safetensors checkpoint into vLLM layout (no vLLM, no HF model object)."""
    from safetensors.torch import load_file

    model_dir = os.fspath(model_dir)
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    config = DecoderConfig.from_hf(model_dir)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise KeyError(f"checkpoint {model_dir} has no tensor {name!r}")
        tensor = state[name]
        return tensor if dtype is None else tensor.to(dtype)

    layers = _named_layers(
        config,
        get,
        qkv=lambda p: torch.cat([get(f"{p}.self_attn.{n}_proj.weight") for n in "qkv"]),
        gate_up=lambda p: torch.cat([get(f"{p}.mlp.gate_proj.weight"), get(f"{p}.mlp.up_proj.weight")]),
    )
    embed = get("model.embed_tokens.weight")
    if config.tie_word_embeddings or "lm_head.weight" not in state:
        lm_head = embed
    else:
        lm_head = get("lm_head.weight")
    weights = BaseWeights(config, embed, layers, get("model.norm.weight"), lm_head)
    weights.check_usable_for_training()
    return weights
