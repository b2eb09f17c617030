"""Replay a trace against an OpenAI-compatible server at the trace's arrival times.

Each request is sent when its arrival offset comes due (open loop: a slow server does not
slow the arrivals down), as a streaming /v1/completions call whose `model` is the adapter
name, so time to first token is measured at the client, as S-LoRA does. Outputs are
forced to exactly `max_tokens` (`ignore_eos`), so every system generates the same work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from openai import AsyncOpenAI

from vllm_slora.bench.metrics import RequestRecord
from vllm_slora.bench.workload import TraceRequest

DEADLINE_ERROR = "Timeout: unfinished at the run deadline"


@dataclass
class ReplayResult:
    records: list[RequestRecord]
    wall_s: float  # first arrival to last completion (or the deadline)


async def _send_one(
    client: AsyncOpenAI, request: TraceRequest, record: RequestRecord, base_model: str, t0: float
) -> None:
    delay = t0 + request.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    record.sent_s = time.perf_counter() - t0
    chunks_with_text = 0
    try:
        stream = await client.completions.create(
            model=request.adapter or base_model,
            prompt=request.prompt,
            max_tokens=request.max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices:
                if record.first_token_s is None:
                    record.first_token_s = time.perf_counter() - t0
                # vLLM streams about one chunk per token; kept current so a request cut
                # at the deadline still reports the tokens it received.
                chunks_with_text += 1
                record.output_tokens = chunks_with_text
            if chunk.usage is not None:  # the final chunk: exact counts
                record.output_tokens = chunk.usage.completion_tokens
                record.prompt_tokens = chunk.usage.prompt_tokens
        if record.first_token_s is None:
            record.error = "EmptyStream: the server sent no tokens"
            return
        record.finished_s = time.perf_counter() - t0
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # every failure is recorded, with its type, never dropped
        record.error = f"{type(exc).__name__}: {exc}"[:500]


async def replay_trace(
    trace: Sequence[TraceRequest],
    base_url: str,
    base_model: str,
    *,
    deadline_s: float | None = None,
    progress_desc: str | None = None,
    api_key: str = "EMPTY",
) -> ReplayResult:
    """Send every request of `trace`; return one record per request, in trace order.

    `deadline_s` bounds the whole replay (arrivals included); requests unfinished by then
    are cancelled and recorded with `DEADLINE_ERROR`.
    """
    from tqdm.auto import tqdm

    records = [RequestRecord(id=r.id, adapter=r.adapter, scheduled_s=r.arrival_s) for r in trace]
    # max_retries=0: a retried request would hide failures and distort latencies.
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=None)
    bar = tqdm(total=len(trace), desc=progress_desc, disable=progress_desc is None, leave=False)
    t0 = time.perf_counter()
    try:
        tasks = [
            asyncio.create_task(_send_one(client, request, record, base_model, t0))
            for request, record in zip(trace, records)
        ]
        for task in tasks:
            task.add_done_callback(lambda _: bar.update(1))
        _, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        bar.close()
        await client.close()
    wall_s = time.perf_counter() - t0
    for record in records:
        if not record.ok and record.error is None:
            record.error = DEADLINE_ERROR
    finished = [r.finished_s for r in records if r.finished_s is not None]
    if finished and not any(r.error == DEADLINE_ERROR for r in records):
        wall_s = max(finished)
    return ReplayResult(records=records, wall_s=wall_s)
