"""`vllm-slora` command line: prepare, adapters, demo, bench, finetune.

Every bad argument is refused before any work starts, with one line on stderr and
exit status 2 (1 when the work itself fails, e.g. an unreadable base model).
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
from pathlib import Path

_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _positive_alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _port(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {value}")
    return value


def _fail(command: str, message: str) -> int:
    print(f"vllm-slora {command}: error: {message}", file=sys.stderr)
    return 1


def _cmd_prepare(args) -> int:
    from vllm_slora.model_prep import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0


def _base_config(base: str) -> dict:
    """The base model's config, or ValueError saying what is wrong with --base."""
    import json

    from vllm_slora.adapters.base_model import BaseModelShape

    path = Path(base)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ValueError(f"--base {base}: no such model folder or config.json")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--base {base}: {config_path.name} cannot be read as JSON ({e})") from None
    try:
        BaseModelShape.from_hf_config(config)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        detail = f"no {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"--base {base}: not a Llama-family model config ({detail})") from None
    config.setdefault("_name_or_path", str(path.resolve() if path.is_dir() else config_path.parent.resolve()))
    return config


def _cmd_adapters(args) -> int:
    from vllm_slora.adapters.generate import generate_adapters

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _fail("adapters", f"--out {out} exists and is not a folder")
    try:
        if args.base:
            config = _base_config(args.base)
        else:
            from vllm_slora.model_prep import prepare_default_model

            config = prepare_default_model() / "config.json"
        adapters = generate_adapters(
            config,
            out,
            num_adapters=args.num,
            ranks=tuple(args.ranks),
            target_modules=tuple(dict.fromkeys(args.targets)),
            lora_alpha=args.alpha,
            use_rslora=args.rslora,
            seed=args.seed,
            overwrite=args.force,
        )
    except FileExistsError as e:
        return _fail("adapters", f"{e} (pass --force to overwrite)")
    except (ValueError, OSError) as e:
        return _fail("adapters", str(e))
    for a in adapters:
        print(f"{a.name}\t{a.rank}\t{a.path}")
    return 0


def _cmd_demo(args) -> int:
    from vllm_slora.demo import DemoConfig, run_demo

    if args.port is not None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", args.port))
            except OSError as e:
                return _fail("demo", f"--port {args.port} cannot be used ({e.strerror})")
    return run_demo(DemoConfig(num_adapters=args.num_adapters, max_tokens=args.max_tokens, port=args.port))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vllm-slora", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prepare", help="build the embedded default model (SmolLM2-135M-Instruct)")
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("adapters", help="write synthetic PEFT LoRA adapters for a Llama-family model")
    p.add_argument("--out", required=True, help="output folder (one sub-folder adapter-NNNN per adapter)")
    p.add_argument("--base", help="base model folder or its config.json (default: the embedded model)")
    p.add_argument("--num", type=_int_at_least(1), default=8, help="number of adapters (default: 8)")
    p.add_argument("--ranks", type=_int_at_least(1), nargs="+", default=[8, 16, 32, 64],
                   help="LoRA ranks, used in turn: adapter i gets ranks[i %% len] (default: 8 16 32 64)")
    p.add_argument("--targets", nargs="+", choices=_TARGETS, default=list(_TARGETS), metavar="MODULE",
                   help=f"projections to adapt, from {', '.join(_TARGETS)} (default: all seven)")
    p.add_argument("--alpha", type=_positive_alpha, default=None, help="lora_alpha, > 0 (default: 2 * rank)")
    p.add_argument("--rslora", action="store_true", help="write use_rslora: scaling alpha / sqrt(r)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same adapters")
    p.add_argument("--force", action="store_true",
                   help="overwrite adapters in --out that were written with other settings")
    p.set_defaults(func=_cmd_adapters)

    p = sub.add_parser("demo", help="serve the default model with adapters and run a workload")
    p.add_argument("--num-adapters", type=_int_at_least(1), default=8, help="adapters to serve (default: 8)")
    p.add_argument("--max-tokens", type=_int_at_least(1), default=32, help="tokens per answer (default: 32)")
    p.add_argument("--port", type=_port, default=None, help="server port (default: a free one)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("finetune", help="train a LoRA adapter inside a vLLM engine (progress bar, loss plot)")
    from vllm_slora.finetune.cli import add_finetune_arguments, run_finetune

    add_finetune_arguments(p)
    p.set_defaults(func=run_finetune)

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
