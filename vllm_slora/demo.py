"""The main job: serve the embedded default model with 8 adapters and run a workload.

Starts `vllm serve` with vllm-slora enabled, sends a short multi-adapter workload through
the `openai` client (each request names its adapter in `model`), prints a per-adapter
summary and stops the server, also on Ctrl-C or error.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

from vllm_slora.model_prep import cache_root, prepare_default_model

DEMO_RANKS = (8, 16, 32, 64)
PROMPTS = (
    "Write one sentence about the sea.",
    "Name three colours.",
    "What is the capital of France?",
    "Give a short tip for learning to cook.",
)


@dataclass
class RequestResult:
    model: str
    ttft_s: float | None = None
    latency_s: float = 0.0
    tokens: int = 0
    error: str | None = None


@dataclass
class DemoConfig:
    num_adapters: int = 8
    requests_per_model: int = 3
    base_requests: int = 3
    max_tokens: int = 32
    concurrency: int = 16
    port: int | None = None
    extra_server_args: list[str] = field(default_factory=list)


def server_args(adapters, max_rank: int) -> list[str]:
    lora_modules = [f"{a.name}={a.path}" for a in adapters]
    return [
        "--served-model-name", "default",
        "--dtype", "float32",
        "--max-model-len", "1024",
        "--gpu-memory-utilization", "0.3",
        "--enable-lora",
        "--max-lora-rank", str(max_rank),
        "--max-loras", str(len(adapters)),
        "--max-cpu-loras", str(len(adapters)),
        "--lora-modules", *lora_modules,
        "--additional-config", json.dumps({"slora": {}}),
    ]


async def _one_request(client, model: str, prompt: str, max_tokens: int) -> RequestResult:
    result = RequestResult(model=model)
    start = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and result.ttft_s is None:
                result.ttft_s = time.perf_counter() - start
            if chunk.usage is not None:
                result.tokens = chunk.usage.completion_tokens
    except Exception as e:  # a failed request is reported, never dropped
        result.error = f"{type(e).__name__}: {e}"
    result.latency_s = time.perf_counter() - start
    return result


async def run_workload(base_url: str, models: list[str], cfg: DemoConfig) -> tuple[list[RequestResult], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    # Round-robin over models so that every engine step mixes several adapters.
    jobs = []
    for j in range(max(cfg.base_requests, cfg.requests_per_model)):
        for i, model in enumerate(models):
            count = cfg.base_requests if model == "default" else cfg.requests_per_model
            if j < count:
                jobs.append((model, PROMPTS[(i + j) % len(PROMPTS)]))
    gate = asyncio.Semaphore(cfg.concurrency)

    async def limited(model, prompt):
        async with gate:
            return await _one_request(client, model, prompt, cfg.max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(m, p) for m, p in jobs))
    elapsed = time.perf_counter() - start
    await client.close()
    return list(results), elapsed


def summarize(results: list[RequestResult], elapsed: float) -> str:
    rows = ["model                 reqs  errors  tokens  tok/s(req)  TTFT p50  TTFT max"]
    by_model: dict[str, list[RequestResult]] = {}
    for r in results:
        by_model.setdefault(r.model, []).append(r)
    for model, rs in by_model.items():
        ok = [r for r in rs if r.error is None]
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        tokens = sum(r.tokens for r in ok)
        rate = statistics.mean(r.tokens / r.latency_s for r in ok) if ok else 0.0
        rows.append(
            f"{model:<20} {len(rs):>5} {len(rs) - len(ok):>7} {tokens:>7} {rate:>11.1f} "
            f"{(statistics.median(ttfts) if ttfts else float('nan')):>8.2f}s "
            f"{(max(ttfts) if ttfts else float('nan')):>8.2f}s"
        )
    total_tokens = sum(r.tokens for r in results if r.error is None)
    errors = sum(r.error is not None for r in results)
    rows.append(
        f"total: {len(results)} requests, {errors} errors, {total_tokens} tokens in {elapsed:.1f} s "
        f"= {total_tokens / elapsed:.1f} tok/s"
    )
    for r in results:
        if r.error:
            rows.append(f"  error [{r.model}]: {r.error}")
    return "\n".join(rows)


def run_demo(cfg: DemoConfig | None = None) -> int:
    from vllm_slora.adapters.generate import generate_adapters
    from vllm_slora.server_process import ServerProcess

    cfg = cfg or DemoConfig()
    print("[demo] preparing the embedded default model (SmolLM2-135M-Instruct)", flush=True)
    model_dir = prepare_default_model()
    adapters = generate_adapters(
        model_dir / "config.json",
        cache_root() / "adapters" / "smollm2-demo",
        num_adapters=cfg.num_adapters,
        ranks=DEMO_RANKS,
        seed=0,
    )
    print(f"[demo] {len(adapters)} adapters, ranks {sorted({a.rank for a in adapters})}", flush=True)
    args = server_args(adapters, max_rank=max(a.rank for a in adapters)) + cfg.extra_server_args
    print("[demo] starting vllm serve with --additional-config '{\"slora\": {}}'", flush=True)
    with ServerProcess(str(model_dir), args, port=cfg.port) as server:
        print(f"[demo] server ready at {server.base_url}; sending workload", flush=True)
        models = ["default"] + [a.name for a in adapters]
        results, elapsed = asyncio.run(run_workload(server.base_url, models, cfg))
    print(summarize(results, elapsed), flush=True)
    return 1 if any(r.error for r in results) else 0
