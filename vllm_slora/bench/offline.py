"""Quick, server-less measurement through `vllm.LLM` (closed batch).

All requests of a trace are submitted at once and arrival times are ignored, so this
measures peak throughput, not latency under a request rate; TTFT here includes queueing
behind the whole batch. It skips the HTTP server and is the quickest way to compare
systems. vLLM spawns engine processes, so call it from code guarded by
`if __name__ == "__main__":` (the `vllm-slora` console script is).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence

from vllm_slora.bench.metrics import RequestRecord, summarize
from vllm_slora.bench.runner import Point, RunOptions
from vllm_slora.bench.systems import AdapterRef, ServerSettings, engine_kwargs


def _record_from_output(request, output) -> RequestRecord:
    record = RequestRecord(id=request.id, adapter=request.adapter, scheduled_s=request.arrival_s, sent_s=0.0)
    completion = output.outputs[0]
    record.prompt_tokens = len(output.prompt_token_ids or [])
    record.output_tokens = len(completion.token_ids)
    stats = output.metrics
    if stats is None or not stats.first_token_latency:
        record.error = "NoMetrics: the engine returned no request stats (disable_log_stats?)"
        return record
    # first_token_latency is measured from the request's arrival in the engine; the
    # decode span comes from engine-core timestamps (a different clock, same units).
    record.first_token_s = stats.first_token_latency
    record.finished_s = stats.first_token_latency + max(0.0, stats.last_token_ts - stats.first_token_ts)
    return record


def run_system_offline(
    system: str,
    model: str,
    adapters: Sequence[AdapterRef],
    points: Sequence[Point],
    settings: ServerSettings,
    options: RunOptions,
) -> list[dict]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    kwargs = engine_kwargs(system, adapters, settings)
    t_start = time.monotonic()
    llm = LLM(model=str(model), served_model_name="base", disable_log_stats=False, **kwargs)
    engine_info = {"kwargs": {k: v for k, v in kwargs.items()}, "startup_s": round(time.monotonic() - t_start, 1)}
    lora_ids = {a.name: LoRARequest(a.name, i + 1, a.path) for i, a in enumerate(adapters)}
    results = []
    try:
        for point in points:
            lora_requests = [
                lora_ids[r.adapter] if r.adapter else None for r in point.trace
            ]
            params = [
                SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in point.trace
            ]
            t0 = time.perf_counter()
            try:
                outputs = llm.generate(
                    [r.prompt for r in point.trace], params, lora_request=lora_requests, use_tqdm=options.progress
                )
                records = [_record_from_output(r, o) for r, o in zip(point.trace, outputs)]
            except Exception as exc:  # a batch failure fails every request in it, visibly
                error = f"{type(exc).__name__}: {exc}"[:500]
                records = [RequestRecord(id=r.id, adapter=r.adapter, scheduled_s=r.arrival_s, error=error)
                           for r in point.trace]
            wall_s = time.perf_counter() - t0
            results.append({
                "system": system, **point.labels, "status": "ok", "mode": "offline",
                "trace": point.trace_path, "engine": engine_info,
                "summary": summarize(records, wall_s, options.ttft_slo_s),
                "records": [r.to_dict() for r in records],
            })
    finally:
        # Stop the engine processes now, not whenever the garbage collector gets to them:
        # the next system must not run next to this one.
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return results
