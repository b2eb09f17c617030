"""Opt-in record of which process loaded what (used by tests to prove activation).

Set `VLLM_SLORA_TRACE_FILE=/path/file.jsonl`; each process appends one JSON line per
event. vLLM passes the environment to the engine and worker processes it spawns.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time

TRACE_ENV = "VLLM_SLORA_TRACE_FILE"


def enabled() -> bool:
    return bool(os.environ.get(TRACE_ENV))


def record(event: str, **fields: object) -> None:
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = {
        "event": event,
        "pid": os.getpid(),
        "process": multiprocessing.current_process().name,
        "t": round(time.time(), 4),  # wall clock: lines of several processes can be put in order
        **fields,
    }
    # One short write in append mode: lines from concurrent processes do not interleave.
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
