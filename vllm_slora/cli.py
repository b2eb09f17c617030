"""`vllm-slora` command line: prepare, adapters, demo, bench."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_prepare(args) -> int:
    from vllm_slora.model_prep import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0


def _cmd_adapters(args) -> int:
    from vllm_slora.adapters.generate import generate_adapters
    from vllm_slora.model_prep import prepare_default_model

    base = Path(args.base) if args.base else prepare_default_model()
    config = base / "config.json" if base.is_dir() else base
    adapters = generate_adapters(
        config,
        Path(args.out),
        num_adapters=args.num,
        ranks=tuple(args.ranks),
        target_modules=tuple(args.targets),
        lora_alpha=args.alpha,
        use_rslora=args.rslora,
        seed=args.seed,
    )
    for a in adapters:
        print(f"{a.name}\t{a.rank}\t{a.path}")
    return 0


def _cmd_demo(args) -> int:
    from vllm_slora.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(num_adapters=args.num_adapters, max_tokens=args.max_tokens, port=args.port))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-slora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build the embedded default model (SmolLM2-135M-Instruct)")
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("adapters", help="write synthetic PEFT LoRA adapters for a Llama-family model")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per adapter)")
    p.add_argument("--base", help="base model folder or config.json (default: the embedded model)")
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument(
        "--targets", nargs="+",
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: generator's)")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_adapters)

    p = sub.add_parser("demo", help="serve the default model with adapters and run a workload")
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="replay an S-LoRA workload on stock vLLM and vllm-slora")
    try:
        from vllm_slora.bench.cli import add_bench_arguments, run_bench

        add_bench_arguments(p)
        p.set_defaults(func=run_bench)
    except ImportError as e:  # keep the other commands usable
        p.set_defaults(func=lambda _a, e=e: print(f"bench unavailable: {e}", file=sys.stderr) or 2)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
