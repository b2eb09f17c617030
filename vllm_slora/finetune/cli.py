"""`vllm-slora finetune`: train a LoRA adapter inside a vLLM engine from the command line.

    vllm-slora finetune --data train.jsonl --out runs/support-bot --steps 100 --prompt "Hi"

Starts a `vllm.LLM` on the base model (default: the embedded SmolLM2-135M-Instruct) with
``{"slora": {"finetune": true}}`` and runs the job through `finetune_in_engine`: the same
in-engine path the server's fine-tuning API uses. Shows a progress bar, writes the PEFT
adapter of every published step, training_log.json and loss.png under --out, and with
--prompt prints the engine's greedy answer without and with the trained adapter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..adapters.modules import SLICE_ORDER
from ..cli import _int_at_least, _positive_alpha


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="training file: JSONL of {messages}, {prompt, completion} or {text}")
    p.add_argument("--validation-data", default=None,
                   help="held-out JSONL (same formats): its loss at every published step (validation_log.json)")
    p.add_argument("--out", required=True, help="output folder (step-N/ adapters, training_log.json, loss.png)")
    p.add_argument("--base", help="base model folder (default: the embedded default model)")
    p.add_argument("--name", default="finetuned", help="adapter name (default: finetuned)")
    p.add_argument("--rank", type=_int_at_least(1), default=8, help="LoRA rank (default: 8)")
    p.add_argument("--alpha", type=_positive_alpha, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--targets", nargs="+", choices=SLICE_ORDER, default=list(SLICE_ORDER), metavar="MODULE",
                   help="projections to adapt (default: all seven)")
    p.add_argument("--steps", type=_int_at_least(1), default=None, help="optimizer steps (default: one epoch)")
    p.add_argument("--epochs", type=_int_at_least(1), default=1, help="epochs when --steps is not given (default: 1)")
    p.add_argument("--lr", type=_positive_alpha, default=2e-4, help="learning rate (default: 2e-4)")
    p.add_argument("--batch-tokens", type=_int_at_least(1), default=2048, help="tokens per packed micro-batch")
    p.add_argument("--batch-size", type=_int_at_least(1), default=None,
                   help="examples per optimizer step, in micro-batches of --batch-tokens (default: one micro-batch)")
    p.add_argument("--max-length", type=_int_at_least(1), default=None, help="longest example (default: batch tokens)")
    p.add_argument("--truncate", action="store_true", help="cut longer examples instead of refusing the file")
    p.add_argument("--publish-every", type=_int_at_least(1), default=None, help="write a version every N steps")
    p.add_argument("--seed", type=int, default=0, help="LoRA init and dropout seed (default: 0)")
    p.add_argument("--prompt", default=None, help="print the greedy answer to this prompt before/after")
    p.add_argument("--max-tokens", type=_int_at_least(1), default=32, help="answer length for --prompt")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"),
                   help="the engine's dtype (default: float32)")


def run_finetune(args) -> int:
    data = Path(args.data)
    if not data.is_file():
        print(f"vllm-slora finetune: error: --data {data}: no such file", file=sys.stderr)
        return 2
    if args.validation_data is not None and not Path(args.validation_data).is_file():
        print(f"vllm-slora finetune: error: --validation-data {args.validation_data}: no such file", file=sys.stderr)
        return 2
    if args.base is not None and not (Path(args.base) / "config.json").is_file():
        print(f"vllm-slora finetune: error: --base {args.base}: not a model folder (no config.json)", file=sys.stderr)
        return 2
    from vllm import LLM, SamplingParams

    from vllm_slora.model_prep import prepare_default_model

    from .data import TrainingDataError
    from .offline import FinetuneFailed, finetune_in_engine

    base = Path(args.base) if args.base else prepare_default_model()
    # float32: training keeps fp32 master weights anyway, and bf16 kernels need CPU features
    # (AVX512-BF16) that many machines lack.
    llm = LLM(str(base), dtype=args.dtype, enable_lora=True, max_lora_rank=max(8, args.rank), enforce_eager=True,
              gpu_memory_utilization=0.3, additional_config={"slora": {"finetune": True}})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    before = llm.generate([args.prompt], params, use_tqdm=False)[0].outputs[0].text if args.prompt else None
    try:
        result = finetune_in_engine(
            llm, data, args.name, out_dir=args.out, rank=args.rank, alpha=args.alpha, target_modules=args.targets,
            max_steps=args.steps, n_epochs=args.epochs, lr=args.lr, batch_tokens=args.batch_tokens,
            batch_size=args.batch_size,
            max_length=args.max_length, truncate=args.truncate, publish_every=args.publish_every, seed=args.seed,
            validation_file=args.validation_data,
        )
    except (TrainingDataError, FinetuneFailed, ValueError) as e:
        print(f"vllm-slora finetune: error: {e}", file=sys.stderr)
        return 1
    records = result.records
    print(f"trained {len(records)} steps, loss {records[0].loss:.4f} -> {records[-1].loss:.4f}")
    print(f"adapter: {result.adapter_dir}")
    for step, loss in result.validation_losses:
        print(f"validation loss at step {step}: {loss:.4f}")
    if result.plot_path is not None:
        print(f"loss plot: {result.plot_path}")
    if args.prompt:
        after = llm.generate([args.prompt], params, lora_request=result.lora_request, use_tqdm=False)[0].outputs[0].text
        print(f"answer without adapter: {before!r}\nanswer with adapter:    {after!r}")
    return 0
