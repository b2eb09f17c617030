"""Scale: 1000 adapters, 2000 zipf-popular requests, a pool that holds a fraction of them.

One engine on the tiny Llama with a small KV budget: adapters and KV blocks come from
the same vLLM block pool, admission waits when the pool is full, idle adapters are
reclaimed when the KV cache needs their blocks, and every request still completes. A
sample of requests is compared with HF transformers + PEFT.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.engines import close_llm, make_llm
from tests.hf_reference import hf_greedy

pytestmark = pytest.mark.engine

NUM_ADAPTERS = 1000
NUM_REQUESTS = 2000
MAX_TOKENS = 3
ZIPF_ALPHA = 1.0
RANKS = (4, 8, 16, 32)
# ~380 blocks of 128 KiB (block 128 tokens x 2 KV heads x 32 x K,V x fp32, x 2 layers):
# room for ~100 adapters of 1-4 blocks next to the KV cache of 256 running requests,
# while the ~150 distinct adapters of a full batch do not fit.
KV_BYTES = 48 * 1024 * 1024


@pytest.fixture(scope="module")
def many_adapters(tiny_model, tmp_path_factory):
    from vllm_slora.adapters.generate import generate_adapters

    root = tmp_path_factory.mktemp("thousand")
    return generate_adapters(tiny_model / "config.json", root, NUM_ADAPTERS, ranks=RANKS, seed=5,
                             output_scale=1.0)


@pytest.fixture(scope="module")
def scale_run(tiny_model, many_adapters, trace_file):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from vllm_slora import trace

    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, NUM_ADAPTERS + 1) ** ZIPF_ALPHA
    choice = rng.choice(NUM_ADAPTERS, size=NUM_REQUESTS, p=weights / weights.sum())
    rng.shuffle(choice)  # popularity is not arrival order
    tok = AutoTokenizer.from_pretrained(tiny_model)
    words = "the quick brown fox jumps over the lazy dog paris is the capital of france".split()
    prompts = [tok(" ".join(words[i % 7 : i % 7 + 3 + i % 5]))["input_ids"] for i in range(NUM_REQUESTS)]
    loras = [LoRARequest(many_adapters[a].name, 1 + int(a), many_adapters[a].path) for a in choice]

    steps_before = len(trace.read(str(trace_file)))
    llm = make_llm(tiny_model, slora={"prefetch_depth": 16}, max_model_len=256, kv_cache_memory_bytes=KV_BYTES,
                   max_num_seqs=256)
    try:
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
            lora_request=loras,
            use_tqdm=False,
        )
        info = llm.collective_rpc("slora_info")[0]
    finally:
        close_llm(llm)
    events = trace.read(str(trace_file))[steps_before:]
    return dict(choice=choice, prompts=prompts, outs=outs, info=info,
                steps=[e for e in events if e["event"] == "step"],
                init=[e for e in events if e["event"] == "scheduler_init"])


def test_every_request_completes(scale_run):
    outs = scale_run["outs"]
    assert len(outs) == NUM_REQUESTS
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert len(set(scale_run["choice"].tolist())) > 300, "zipf over 1000 adapters should touch hundreds"


def test_sample_matches_hf_peft(scale_run, tiny_model, many_adapters):
    choice, prompts, outs = scale_run["choice"], scale_run["prompts"], scale_run["outs"]
    # The most popular adapter, a rare one, and a few in between.
    order = np.argsort(choice, kind="stable")
    sample = sorted({int(order[0]), int(order[len(order) // 3]), int(order[len(order) // 2]), int(order[-1]), 7})
    for i in sample:
        adapter = many_adapters[int(choice[i])]
        want = hf_greedy(tiny_model, [prompts[i]], MAX_TOKENS, adapter_dir=adapter.path)[0]
        # ignore_eos: HF stops at EOS, so compare the common prefix length of HF's answer.
        got = list(outs[i].outputs[0].token_ids)[: len(want)]
        assert got == want, f"request {i} ({adapter.name}, rank {adapter.rank}) differs from HF+PEFT"


def test_one_pool_for_adapters_and_kv_with_reclaim(scale_run):
    steps = scale_run["steps"]
    assert steps, "the scheduler recorded no steps"
    total = steps[0]["total_blocks"]
    distinct = len(set(scale_run["choice"].tolist()))
    # The pool cannot hold every adapter touched at once...
    assert max(s["pinned_adapter_blocks"] + s["cached_adapter_blocks"] for s in steps) < distinct
    # ...adapters and KV share it in the same steps, never more than the pool...
    shared = [s for s in steps if s["pinned_adapter_blocks"] > 0 and s["kv_blocks"] > 0]
    assert len(shared) > len(steps) // 2
    assert all(s["pinned_adapter_blocks"] + s["kv_blocks"] <= total - 1 for s in steps)
    # ...and idle adapters' blocks went back to the KV cache under pressure.
    last = steps[-1]
    assert last["evictions"] > 0, "no adapter was ever reclaimed: the pool was not under pressure"
    assert last["loads"] >= distinct, "every touched adapter was loaded at least once"
    assert last["loads"] > last["evictions"] > 0


def test_queue_head_adapters_are_read_off_the_step(scale_run):
    # The scheduler named adapters of waiting requests ahead of time, and workers read and
    # packed them in the background instead of on the step that loaded them.
    assert sum(s["step_warm"] for s in scale_run["steps"]) > 0
    assert scale_run["info"]["host_cache"]["warmed"] > 0


def test_at_least_64_adapters_in_one_step(scale_run):
    assert max(s["scheduled_adapters"] for s in scale_run["steps"]) >= 64


def test_resident_adapters_hold_their_computed_blocks(scale_run, many_adapters):
    info = scale_run["info"]
    assert info["adapters"], "no adapter resident at the end"
    by_name = {a.name: a for a in many_adapters}
    for entry in info["adapters"].values():
        # Blocks allocated by the scheduler == pages the worker packed == what the layout needs.
        assert len(entry["block_ids"]) == entry["packed_pages"], entry
        rank = by_name[entry["name"]].rank
        # Independent arithmetic: rank x (in + out) per projection, over 2 layers of the
        # tiny model (hidden 128, kv out 64, intermediate 256), fp32.
        per_layer = rank * ((128 + 128) + 2 * (128 + 64) + (128 + 128) + 2 * (128 + 256) + (256 + 128))
        assert entry["shard_elements"] == 2 * per_layer
        dense_pages = -(-per_layer * 4 // entry["page_bytes"])
        assert dense_pages <= len(entry["block_ids"]) <= dense_pages + 1, (entry, dense_pages)


def test_trace_is_json_lines(trace_file):
    for line in trace_file.read_text().splitlines()[:5]:
        json.loads(line)
