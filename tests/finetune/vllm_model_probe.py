"""Run in a subprocess by test_vllm_weights.py: build vLLM's own LlamaForCausalLM (no engine),
take its weights with base_weights_from_vllm and run the training forward on them.

A separate process because vLLM's model-parallel state is process-global and must not leak
into other tests. Writes a torch file with what the test checks.

    python -m tests.finetune.vllm_model_probe MODEL_DIR ADAPTER_DIR IDS_FILE OUT_FILE
"""

from __future__ import annotations

import sys
import tempfile
import traceback

import torch


def build_vllm_model(config, keep_dense_weights: bool):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers import utils as layer_utils
    from vllm.model_executor.model_loader import get_model

    original = layer_utils.dispatch_cpu_unquantized_gemm
    if keep_dense_weights:
        # vLLM's CPU backend repacks linear weights and drops the dense tensor; keep it.
        layer_utils.dispatch_cpu_unquantized_gemm = lambda layer, remove_weight: original(layer, remove_weight=False)
    try:
        with set_current_vllm_config(config):
            return get_model(vllm_config=config)
    finally:
        layer_utils.dispatch_cpu_unquantized_gemm = original


def main(model_dir: str, adapter_dir: str, ids_file: str, out_file: str) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.engine.arg_utils import EngineArgs

    from vllm_slora.finetune.base_weights import base_weights_from_vllm
    from vllm_slora.finetune.forward import forward_logits
    from vllm_slora.finetune.lora_params import LoraParams

    # CPU-only host: vLLM's CPU worker makes these no-ops the same way before loading.
    torch.accelerator.empty_cache = lambda *args, **kwargs: None
    config = EngineArgs(model=model_dir, dtype="float32", enforce_eager=True).create_engine_config()
    with set_current_vllm_config(config):
        init_file = tempfile.NamedTemporaryFile(delete=False).name
        init_distributed_environment(1, 0, f"file://{init_file}", 0, backend="gloo")
        ensure_model_parallel_initialized(1, 1)

    result: dict = {}
    stock = build_vllm_model(config, keep_dense_weights=False)
    try:
        base_weights_from_vllm(stock)
        result["stock_error"] = None
    except ValueError as e:
        result["stock_error"] = str(e)
    del stock
    # Attention layers register by name in the config; a second model on it needs a clean slate.
    config.compilation_config.static_forward_context.clear()

    model = build_vllm_model(config, keep_dense_weights=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    base = base_weights_from_vllm(model)
    result["shares_storage"] = all(
        getattr(base.layers[i], field).data_ptr() == params[f"model.layers.{i}.{name}.weight"].data_ptr()
        for i in range(base.config.num_layers)
        for field, name in (("qkv", "self_attn.qkv_proj"), ("gate_up", "mlp.gate_up_proj"), ("down", "mlp.down_proj"))
    ) and base.embed_tokens.data_ptr() == params["model.embed_tokens.weight"].data_ptr()
    result["padded_vocab"] = int(params["model.embed_tokens.weight"].shape[0])
    lora = LoraParams.from_peft_dir(adapter_dir, base.config)
    ids = torch.load(ids_file)
    with torch.no_grad():
        result["logits"] = forward_logits(base, lora, ids)
    # A training step on vLLM's tensors: gradients reach LoRA only.
    logits = forward_logits(base, lora, ids)
    logits.float().logsumexp(-1).mean().backward()
    result["lora_grads"] = all(p.grad is not None for p in lora.parameters())
    result["base_grads"] = any(p.grad is not None for p in model.parameters())
    torch.save(result, out_file)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:5])
    except Exception:
        traceback.print_exc()
        sys.exit(1)
