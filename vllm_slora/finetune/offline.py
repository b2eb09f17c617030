"""Finetune a LoRA adapter inside a running `vllm.LLM` (the offline face of co-serving).

    from vllm import LLM
    from vllm_slora.finetune.offline import finetune_in_engine

    llm = LLM(model, enable_lora=True, max_lora_rank=16,
              additional_config={"slora": {"finetune": True}})
    result = finetune_in_engine(llm, "train.jsonl", "my-adapter", max_steps=50)
    llm.generate(prompts, lora_request=result.lora_request)

The job trains in the engine's worker on the engine's own weights, in the time inference
leaves (the same path as the server's fine-tuning API): requests generated meanwhile are
served as usual. A progress bar follows the steps; the result has the adapter directory
(PEFT files of the last step), every step's record and a loss plot (PNG, with matplotlib).
With `validation_file`, every published version's loss over that whole file (no dropout)
is computed in the engine too (`validation_losses`, and in the plot).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..adapters.modules import SLICE_ORDER
from ..step_plan import TrainJobSpec
from .coserve_worker import BATCHES_FILE, VALIDATION_BATCHES_FILE
from .data import load_training_file
from .lora_params import LoraParams, LoraSettings
from .model_config import DecoderConfig
from .packing import pack_examples, save_batches, save_steps, step_micro_batches
from .trainer import StepRecord, TrainingSettings, plot_loss

POLL_S = 0.05
# LoRA ids handed out by this module: far from those a caller numbers from 1.
_lora_ids = itertools.count(1 << 30)


class FinetuneFailed(RuntimeError):
    pass


@dataclass
class EngineFinetuneResult:
    name: str
    adapter_dir: Path  # the last published version (PEFT files)
    records: list[StepRecord]
    published: list[tuple[int, Path]] = field(default_factory=list)  # (step, directory) per version
    plot_path: Path | None = None
    unit_ms: dict | None = None  # the worker's expected time per unit kind at the last step
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss over the validation file)

    @property
    def lora_request(self):
        """A LoRARequest serving the last version (a fresh id per call: a new version, a new id)."""
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name, next(_lora_ids), str(self.adapter_dir))


def engine_utility(llm) -> Callable[[str, dict], dict]:
    """Send one co-served finetuning action to `llm`'s engine (in its process or in this one)."""
    client = llm.llm_engine.engine_core
    if hasattr(client, "call_utility"):  # the engine runs in its own process and steps on its own
        return lambda action, payload: client.call_utility("slora_finetune", action, payload)
    core = client.engine_core  # InprocClient: nobody steps the engine but us

    def call(action: str, payload: dict) -> dict:
        if action == "poll":
            llm.llm_engine.step()
        return core.slora_finetune(action, payload)

    return call


def finetune_in_engine(
    llm,
    training_file: str | os.PathLike,
    name: str = "finetuned",
    out_dir: str | os.PathLike | None = None,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: Sequence[str] = SLICE_ORDER,
    max_steps: int | None = None,
    n_epochs: int = 1,
    lr: float = 2e-4,
    batch_tokens: int = 2048,
    batch_size: int | None = None,
    max_length: int | None = None,
    truncate: bool = False,
    publish_every: int | None = None,
    seed: int = 0,
    use_rslora: bool = False,
    dropout: float = 0.0,
    weight_decay: float = 0.01,
    warmup_steps: int = 0,
    max_grad_norm: float | None = None,
    progress: bool = True,
    on_step: Callable[[StepRecord], None] | None = None,
    on_publish: Callable[[int, Path], None] | None = None,
    validation_file: str | os.PathLike | None = None,
) -> EngineFinetuneResult:
    """Train a LoRA adapter in `llm`'s engine and wait for the job to end (see the module doc).

    A step trains on one packed micro-batch of at most `batch_tokens` tokens, or, with
    `batch_size`, on that many examples, packed into as many such micro-batches as they need
    (their gradients accumulate into one update)."""
    model_config = llm.llm_engine.vllm_config.model_config
    model_dir = model_config.model
    max_length = min(batch_tokens, int(model_config.max_model_len)) if max_length is None else max_length
    out = Path(out_dir) if out_dir is not None else Path(model_dir).parent / "finetune" / f"{name}-{secrets.token_hex(4)}"
    examples = load_training_file(training_file, llm.get_tokenizer(), max_length=max_length, truncate=truncate)
    epoch = step_micro_batches(examples, batch_size, batch_tokens)  # the steps of one epoch
    out.mkdir(parents=True, exist_ok=True)
    steps = max_steps or n_epochs * len(epoch)
    settings = LoraSettings(r=rank, alpha=float(alpha if alpha is not None else 2 * rank),
                            target_modules=tuple(target_modules), use_rslora=use_rslora, dropout=dropout)
    lora = LoraParams.init(DecoderConfig.from_hf(model_dir), settings, seed=seed)
    lora.save_peft(out / "step-0", base_model_name_or_path=model_dir)
    save_steps(epoch, out / BATCHES_FILE)
    if validation_file is not None:  # read with the training file's rules, packed alike
        held_out = load_training_file(validation_file, llm.get_tokenizer(), max_length=max_length, truncate=truncate)
        save_batches(pack_examples(held_out, batch_tokens), out / VALIDATION_BATCHES_FILE)
    training = TrainingSettings(max_steps=steps, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                max_grad_norm=max_grad_norm)
    job_id = f"offline-{secrets.token_hex(6)}"
    call = engine_utility(llm)
    call("submit", asdict(TrainJobSpec(
        job_id=job_id, adapter_name=name, job_dir=str(out), init_adapter_dir=str(out / "step-0"),
        settings=asdict(training), total_steps=steps,
        publish_every=publish_every or max(1, min(len(epoch), steps)), seed=seed, base_model=model_dir,
    )))
    bar = _progress_bar(steps, name) if progress else None
    result = EngineFinetuneResult(name, out / "step-0", [])
    after = 0
    try:
        while True:
            reply = call("poll", {"job_id": job_id, "after": after})
            after = reply["next"]
            for event in reply["events"]:
                data, step = event["data"], event["step"]
                if event["kind"] == "step":
                    record = StepRecord(step=step, loss=data["loss"], lr=data["lr"], loss_tokens=data["loss_tokens"],
                                        tokens=data["tokens"], seconds=data["seconds"])
                    result.records.append(record)
                    result.unit_ms = data.get("unit_ms")
                    if bar is not None:
                        bar.update(1)
                        valid = result.validation_losses[-1:]
                        bar.set_postfix(loss=f"{record.loss:.4f}", **({"valid": f"{valid[0][1]:.4f}"} if valid else {}))
                    if on_step is not None:
                        on_step(record)
                elif event["kind"] == "published":
                    path = Path(data["path"])
                    result.published.append((step, path))
                    result.adapter_dir = path
                    if on_publish is not None:
                        on_publish(step, path)
                elif event["kind"] == "validated":
                    result.validation_losses.append((step, data["loss"]))
                elif event["kind"] in ("failed", "cancelled"):
                    raise FinetuneFailed(f"finetuning job {job_id} {event['kind']} at step {step}: "
                                         f"{data.get('message', '')}".rstrip(": "))
            if reply["status"] not in ("queued", "running"):
                break
            time.sleep(POLL_S)
    except BaseException:
        if reply_active(call, job_id):
            call("cancel", {"job_id": job_id})
        raise
    finally:
        if bar is not None:
            bar.close()
    (out / "training_log.json").write_text(json.dumps([asdict(r) for r in result.records], indent=1))
    if result.validation_losses:
        (out / "validation_log.json").write_text(json.dumps(
            [{"step": step, "loss": loss} for step, loss in result.validation_losses], indent=1))
    try:
        result.plot_path = plot_loss(result.records, out / "loss.png", result.validation_losses)
    except ImportError:
        pass
    return result


def reply_active(call, job_id: str) -> bool:
    try:
        return call("poll", {"job_id": job_id, "after": 1 << 30})["status"] in ("queued", "running")
    except Exception:
        return False


def _progress_bar(total: int, name: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"finetune {name}", unit="step")
