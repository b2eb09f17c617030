"""Fakes and helpers of the fine-tuning API tests: a recording adapter host, jobs without a server."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import pytest

from tests.finetune.training_cases import SENTENCES
from vllm_slora.finetune.files import FileStore
from vllm_slora.finetune.jobs import EngineInfo, FineTuningJobs, PublishError


def training_lines() -> list[dict]:
    lines = []
    for sentence in SENTENCES:
        words = sentence.split(" ")
        cut = len(words) // 2
        lines.append({"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])})
    return lines


def jsonl(lines) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


class FakeHost:
    """Records what would be served; `adapters` maps loaded names to their directories."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, str, bool]] = []
        self.adapters: dict[str, str] = {}
        self.refuse: str | None = None

    async def load(self, name: str, path: str, replace: bool) -> None:
        if self.refuse:
            raise PublishError(self.refuse, 400)
        if not replace and name in self.adapters:
            raise PublishError(f"{name} already loaded", 400)
        self.loads.append((name, path, replace))
        self.adapters[name] = path

    def path_of(self, name: str) -> str | None:
        return self.adapters.get(name)


def make_jobs(tmp_path: Path, tiny_model: Path, max_bytes: int = 1 << 20, engine_call=None,
              **engine) -> FineTuningJobs:
    """Jobs on a FakeHost; `engine_call` (e.g. InProcessEngine.call) makes them train in that engine."""
    info = dict(served_models=("base", "other"), model_dir=str(tiny_model), tokenizer=str(tiny_model),
                max_model_len=256, max_lora_rank=8)
    info.update(engine)
    files = FileStore(tmp_path / "files", max_bytes)
    jobs = FineTuningJobs(tmp_path / "jobs", EngineInfo(**info), files, FakeHost(), engine_call=engine_call)
    files.checks["fine-tune"] = jobs.check_training_file
    return jobs


def upload(jobs: FineTuningJobs, data: bytes, name: str = "train.jsonl", purpose: str = "fine-tune"):
    return jobs.files.create(name, purpose, io.BytesIO(data))


def api_error(call, *args, **kwargs):
    from vllm_slora.finetune.files import ApiError

    with pytest.raises(ApiError) as info:
        result = call(*args, **kwargs)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    return info.value


async def wait_until(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run_to_end(jobs: FineTuningJobs, body: dict) -> dict:
    """Create a job from `body` and wait (on a fresh event loop) until it has ended; its record."""
    async def scenario():
        job = await jobs.create(body)
        await wait_until(lambda: jobs.retrieve(job["id"])["status"] not in ("queued", "running"))
        return jobs.retrieve(job["id"])

    return asyncio.run(scenario())


def supervised(**hyper) -> dict:
    return {"type": "supervised", "supervised": {"hyperparameters": hyper}}
