"""The Llama projections a LoRA may target, and how vLLM packs them.

vLLM fuses q/k/v into one column-parallel `qkv_proj` and gate/up into `gate_up_proj`;
each fused layer carries one LoRA *slice* per original projection. Every layer of an
adapter is described by the seven slices in `SLICE_ORDER`, always in that order and
always all seven (an untargeted slice has rank 0), so slice ``i`` of any adapter means
the same projection everywhere: in specs, loaded weights, page layouts and kernels.
"""

from __future__ import annotations

# Fixed slice order: qkv slices, o, gate/up slices, down.
SLICE_ORDER: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
SLICE_INDEX: dict[str, int] = {name: i for i, name in enumerate(SLICE_ORDER)}

# Submodule of a decoder layer that owns each projection (HF Llama naming).
PARENT_MODULE: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

# vLLM's fused layers and the slices each one carries, in slice order.
PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}

# Column-parallel layers split their output across TP ranks; the others (o, down) are
# row-parallel and split their input.
COLUMN_PARALLEL: frozenset[str] = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})


def module_name(layer: int, projection: str) -> str:
    """The projection's module name inside a HF `LlamaForCausalLM`.

    PEFT matches `target_modules`, `rank_pattern` and `alpha_pattern` against these
    names, so we match against the very same strings.
    """
    return f"model.layers.{layer}.{PARENT_MODULE[projection]}.{projection}"


def unsupported_module_names(num_layers: int) -> list[str]:
    """Modules of a Llama model a LoRA could name but vllm-slora does not serve."""
    names = ["lm_head", "model", "model.embed_tokens", "model.norm", "model.rotary_emb", "model.layers"]
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}"
        names += [
            prefix,
            f"{prefix}.input_layernorm",
            f"{prefix}.post_attention_layernorm",
            f"{prefix}.self_attn",
            f"{prefix}.mlp",
            f"{prefix}.mlp.act_fn",
        ]
    return names
