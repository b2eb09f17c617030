"""LoRA finetuning on frozen vLLM-layout base weights: the foundation of co-serving training (#10).

Pieces, one concept per module:

* `data`: JSONL training files (chat `messages`, `prompt`/`completion`, `text`) -> token
  ids + labels (loss mask), with errors naming the line;
* `packing`: whole examples packed back to back into micro-batches by a token budget;
* `model_config`, `rope`: the decoder's shapes and rotary embeddings (default, linear, llama3);
* `base_weights`: frozen base weights in vLLM's fused layout, taken by reference from a
  vLLM model, or built from a HF model / safetensors checkpoint;
* `lora_params`: the trainable A/B per (layer, projection), PEFT init, PEFT files in and out;
* `forward`, `loss`: a functional Llama forward (packed, block-diagonal causal attention,
  optional per-layer activation checkpointing) and the token-mean loss;
* `trainer`: AdamW loop with per-step records and a progress callback; `finetune()` trains
  offline from a HF checkpoint directory and writes a PEFT adapter plus a loss plot;
* `files`, `jobs`, `api`: the OpenAI Files and Fine-tuning API in `vllm serve` (slora
  engines). Jobs run today in a background thread of the API server process on their own
  copy of the base weights and publish each version through the server's adapter loading
  (PEFT files on disk + in-place reload).

Not done yet (later parts of #10): running training inside the engine on vLLM's own
weights (worker hook, layer-sliced work units scheduled into each step's latency slack),
scheduler budgeting, publishing each optimizer step straight into the unified pool's
pages as a new version, job resume after a restart, gradient accumulation over
micro-batches, chunked LM head + loss for large vocabularies, tensor parallelism,
quantized bases.
"""

from .base_weights import BaseWeights, base_weights_from_checkpoint, base_weights_from_hf, base_weights_from_vllm
from .data import TrainingDataError, TrainingExample, load_training_file
from .lora_params import LoraParams, LoraSettings
from .loss import packed_loss
from .model_config import DecoderConfig
from .packing import PackedBatch, pack_examples
from .trainer import FinetuneResult, LoraTrainer, StepRecord, TrainingSettings, finetune

__all__ = [
    "BaseWeights",
    "DecoderConfig",
    "FinetuneResult",
    "LoraParams",
    "LoraSettings",
    "LoraTrainer",
    "PackedBatch",
    "StepRecord",
    "TrainingDataError",
    "TrainingExample",
    "TrainingSettings",
    "base_weights_from_checkpoint",
    "base_weights_from_hf",
    "base_weights_from_vllm",
    "finetune",
    "load_training_file",
    "pack_examples",
    "packed_loss",
]
