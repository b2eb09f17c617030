"""Trained tokens/s of one training step: the co-served job's layer units vs an HF + PEFT loop.

The co-served job trains with `LayerSlicedPass` (finetune/layer_units.py): the same math
as HF + PEFT on the same weights, split into layer units, each layer either keeping its
autograd graph until backward or recomputing it there, as much as the memory granted
holds. This benchmark times that step in one process, interleaved with the HF + PEFT
step a user would run instead (AdamW on the PEFT model, a padded batch of the same
sequences), so machine noise hits both alike; the server benchmark (bench_coserve.py)
measures the same comparison through `vllm serve`, minutes apart.

Workloads (default model, fp32, LoRA rank 16 on all 7 projections):
  1x256       one 256-token sequence per step (bench_coserve's job)
  8x256       eight packed 256-token sequences (2048 tokens, the API's default batch_tokens)
  mixed-2048  eight packed sequences of different lengths, 2048 tokens (HF pads them)
Systems: hf_peft, units with no / half / every layer graph kept, and units with every graph
kept but the base weights' products through F.linear (torch's MKL sgemm) instead of
oneDNN (finetune/frozen_linear.py; VLLM_SLORA_ONEDNN_TRAINING=0). Every system starts
from the same adapter (B = 0, PEFT's init); the losses of their first two (untimed)
steps must agree, the second one after an AdamW update from each system's own
gradients (checked: the same math; the run exits 1 otherwise).

    .venv/bin/python benchmarks/bench_training_pass.py [--repeats 3] [--threads 2]

Writes benchmarks/results/training_pass-<date>-<machine>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WORKLOADS = {
    "1x256": (256,),
    "8x256": (256,) * 8,
    "mixed-2048": (100, 300, 200, 424, 250, 150, 380, 244),
}
GRAPHS = {"units:recompute": 0.0, "units:half-graphs": 0.5, "units:all-graphs": 1.0}  # share of layers kept
F_LINEAR = "units:all-graphs:F.linear"  # every graph kept, base products by torch's F.linear (not oneDNN)
ONEDNN_ENV = "VLLM_SLORA_ONEDNN_TRAINING"  # finetune/frozen_linear.py's switch
LOSS_AGREEMENT = 1e-4  # losses of the first two steps of all systems, relative


def sequences(lens: Sequence[int], vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lens]


def packed_batch(seqs: list[list[int]]):
    """The sequences as the job packs them (finetune/packing.py), loss on every next token."""
    from vllm_slora.finetune.data import TrainingExample
    from vllm_slora.finetune.packing import pack_examples

    examples = [TrainingExample(line, s, list(s)) for line, s in enumerate(seqs)]
    (batch,) = pack_examples(examples, sum(len(s) for s in seqs))
    return batch


def hf_step_fn(model_dir: Path, adapter_dir: Path, seqs: list[list[int]], lr: float) -> Callable[[], float]:
    """HF + PEFT as a user trains: a right-padded batch with its attention mask, labels -100 on
    the padding, loss.backward(), AdamW on the LoRA parameters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.int64)
    mask = torch.zeros(len(seqs), width, dtype=torch.int64)
    labels = torch.full((len(seqs), width), -100, dtype=torch.int64)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
        labels[row, :len(s)] = torch.tensor(s)
    padded = mask.sum().item() < mask.numel()

    def step() -> float:
        loss = model(input_ids=ids, attention_mask=mask if padded else None, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def units_step_fn(base, adapter_dir: Path, batch, graph_share: float, lr: float) -> Callable[[], float]:
    """The co-served job's step: every unit of a LayerSlicedPass (the loss in one unit, as an
    idle engine runs it), then the trainer's AdamW update."""
    from vllm_slora.finetune.layer_units import LayerSlicedPass
    from vllm_slora.finetune.lora_params import LoraParams
    from vllm_slora.finetune.trainer import LoraTrainer, TrainingSettings

    lora = LoraParams.from_peft_dir(adapter_dir, base.config)
    trainer = LoraTrainer(base, lora, TrainingSettings(lr=lr))
    graph_layers = round(graph_share * base.config.num_layers)

    def step() -> float:
        trainer.zero_grad()
        unit_pass = LayerSlicedPass(base, lora, batch, graph_layers=graph_layers)
        while not unit_pass.done:
            unit_pass.run_unit(batch.num_tokens if unit_pass.next_kind == "loss" else None)
        trainer.update(batch, unit_pass.loss, trainer.lr, 0.0)
        return unit_pass.loss

    return step


def with_env(step: Callable[[], float], name: str, value: str) -> Callable[[], float]:
    """`step` run with the environment variable `name` set to `value` (restored after)."""
    def wrapped() -> float:
        previous = os.environ.get(name)
        os.environ[name] = value
        try:
            return step()
        finally:
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous

    return wrapped


def run(args) -> dict:
    from vllm_slora.bench.machine import machine_info
    from vllm_slora.finetune.base_weights import base_weights_from_checkpoint
    from vllm_slora.finetune.lora_params import LoraParams, LoraSettings
    from vllm_slora.model_prep import prepare_default_model

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else prepare_default_model()
    base = base_weights_from_checkpoint(model_dir, dtype=torch.float32)
    workloads = {name: WORKLOADS[name] for name in args.workloads}
    scale = args.length_scale
    workloads = {name: tuple(max(2, int(n * scale)) for n in lens) for name, lens in workloads.items()}
    adapter_dir = Path(tempfile.mkdtemp(prefix="bench-training-pass-")) / "init"
    LoraParams.init(base.config, LoraSettings(r=args.rank, alpha=2.0 * args.rank, target_modules=TARGETS),
                    seed=args.seed).save_peft(adapter_dir, base_model_name_or_path=str(model_dir))

    results = []
    for name, lens in workloads.items():
        seqs = sequences(lens, base.config.vocab_size, args.seed)
        batch = packed_batch(seqs)
        systems = {"hf_peft": hf_step_fn(model_dir, adapter_dir, seqs, args.lr)}
        for label, share in GRAPHS.items():
            systems[label] = units_step_fn(base, adapter_dir, batch, share, args.lr)
        systems[F_LINEAR] = with_env(units_step_fn(base, adapter_dir, batch, 1.0, args.lr), ONEDNN_ENV, "0")
        warm_up = {label: [step(), step()] for label, step in systems.items()}
        seconds: dict[str, list[float]] = {label: [] for label in systems}
        for _ in range(args.repeats):  # interleaved: each round times every system once
            for label, step in systems.items():
                started = time.perf_counter()
                step()
                seconds[label].append(time.perf_counter() - started)
        reference = warm_up["hf_peft"]
        worst = max(abs(v - r) / abs(r) for losses in warm_up.values() for v, r in zip(losses, reference))
        row = {"workload": name, "seq_lens": list(lens), "tokens": sum(lens), "first_two_losses": warm_up,
               "loss_max_rel_diff": worst, "same_math": worst <= LOSS_AGREEMENT, "systems": {}}
        for label, values in seconds.items():
            median = statistics.median(values)
            row["systems"][label] = {"step_s": values, "median_step_s": median, "tok_s": sum(lens) / median}
        hf = row["systems"]["hf_peft"]["tok_s"]
        for figures in row["systems"].values():
            figures["vs_hf_peft"] = figures["tok_s"] / hf
        results.append(row)
        print(f"{name:11s} " + "  ".join(f"{label} {f['tok_s']:6.1f} tok/s ({f['vs_hf_peft']:.2f}x)"
                                         for label, f in row["systems"].items())
              + f"  | first two steps' losses agree within {worst:.1e}", flush=True)
        del systems
    return {"created": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info(),
            "config": {"model": str(model_dir), "threads": args.threads, "rank": args.rank, "lr": args.lr,
                       "repeats": args.repeats, "seed": args.seed, "dtype": "float32", "targets": list(TARGETS)},
            "results": results}


def plot(document: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = document["results"]
    labels = list(rows[0]["systems"])
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, label in enumerate(labels):
        xs = [k + i * width for k in range(len(rows))]
        ys = [row["systems"][label]["tok_s"] for row in rows]
        bars = ax.bar(xs, ys, width, label=label)
        for bar, row in zip(bars, rows):
            ax.annotate(f"{row['systems'][label]['vs_hf_peft']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(rows))], [row["workload"] for row in rows])
    ax.set_ylabel("trained tokens / s (median step)")
    machine = document["machine"]
    ax.set_title(f"One training step: layer units vs HF + PEFT (x = vs HF + PEFT)\n"
                 f"{machine.get('cpu_model')}, {document['config']['threads']} threads, rank {document['config']['rank']}",
                 fontsize=9)
    top = max(f["tok_s"] for row in rows for f in row["systems"].values())
    ax.set_ylim(0, top * 1.22)
    ax.legend(fontsize=8, loc="upper center", ncols=len(labels))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the embedded default model)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--length-scale", type=float, default=1.0, help="scale every sequence length (tests)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per system (interleaved)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(RESULTS))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from vllm_slora.bench.machine import machine_tag

    args = parse_args(argv)
    document = run(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"training_pass-{time.strftime('%Y%m%d')}-{machine_tag(document['machine'])}"
    stem.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    png = plot(document, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json')}" + (f" and {png}" if png else ""))
    return 0 if all(row["same_math"] for row in document["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
