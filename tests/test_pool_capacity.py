"""32 adapters up to rank 64 on SmolLM2-135M at gpu_memory_utilization=0.3.

Stock vLLM reserves `max_loras x max_lora_rank` padded slots for every LoRA layer before
the KV cache is sized. With --max-loras 32 the slots (2.5 GB here) eat the budget:
measured on this machine stock keeps 32-223 blocks for KV (depending on what else the
process holds), the plugin ~750; on a machine with less memory stock cannot start at all
(DESIGN.md §8: -1.3 GiB at a 3.25 GiB budget). With the plugin there are no
slots: adapters take KV blocks only while resident, and all 32 run in one batch.
"""

from __future__ import annotations

import pytest

from tests.engines import close_llm, make_adapters_known, make_llm

pytestmark = pytest.mark.engine

NUM_ADAPTERS = 32
RANKS = (8, 16, 32, 64)
MEMORY = dict(gpu_memory_utilization=0.3, kv_cache_memory_bytes=None, max_model_len=512)


@pytest.fixture(scope="module")
def adapters32(default_model, tmp_path_factory):
    from vllm_slora.adapters.generate import generate_adapters

    return generate_adapters(default_model / "config.json", tmp_path_factory.mktemp("a32"), NUM_ADAPTERS,
                             ranks=RANKS, seed=32)


def kv_blocks_or_none(model, **kwargs) -> int | None:
    """KV blocks the engine got, or None when it cannot start."""
    try:
        llm = make_llm(model, **kwargs, **MEMORY)
    except Exception as e:  # vLLM fails start-up from its KV sizing
        text = f"{e!r} {e.__cause__!r}".lower()
        assert "memory" in text or "initialization failed" in text, text
        return None
    try:
        return llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    finally:
        close_llm(llm)


@pytest.fixture(scope="module")
def stock32_blocks(default_model):
    return kv_blocks_or_none(default_model, slora=None, max_loras=NUM_ADAPTERS)


def test_plugin_starts_and_serves_all_32_in_one_step(default_model, adapters32, trace_file, stock32_blocks):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from vllm_slora import trace

    llm = make_llm(default_model, slora={}, **MEMORY)
    try:
        loras = [LoRARequest(a.name, 1 + i, a.path) for i, a in enumerate(adapters32)]
        make_adapters_known(llm, loras)
        before = len(trace.read(str(trace_file)))
        outs = llm.generate(["Tell me about the sea."] * NUM_ADAPTERS,
                            SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), lora_request=loras,
                            use_tqdm=False)
        info = llm.collective_rpc("slora_info")[0]
        slora_blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    finally:
        close_llm(llm)
    # Stock with 32 slots either cannot start, or its KV cache is short by about what its
    # padded slots take: 32 x rank 64 x (in + out of the 7 projections) x 30 layers, fp32,
    # over the bytes of one block (128 tokens x 3 KV heads x 64 x K,V x fp32 x 30 layers).
    slot_bytes = NUM_ADAPTERS * 64 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536)) * 30 * 4
    block_bytes = 128 * 3 * 64 * 2 * 4 * 30
    if stock32_blocks is not None:
        assert slora_blocks - stock32_blocks >= 0.8 * slot_bytes / block_bytes, (stock32_blocks, slora_blocks)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4] * NUM_ADAPTERS
    steps = [e for e in trace.read(str(trace_file))[before:] if e["event"] == "step"]
    assert max(s["scheduled_adapters"] for s in steps) == NUM_ADAPTERS

    # Blocks follow each adapter's own rank, not max_lora_rank: rank 8 costs ~1/8 of rank 64.
    resident = info["adapters"]
    assert len(resident) == NUM_ADAPTERS
    blocks = {}
    for entry in resident.values():
        assert len(entry["block_ids"]) == entry["packed_pages"], entry
        rank = next(a.rank for a in adapters32 if a.name == entry["name"])
        blocks.setdefault(rank, set()).add(len(entry["block_ids"]))
        # Independent arithmetic: rank x (in + out) summed over the 7 projections of one
        # layer of SmolLM2-135M (hidden 576, kv 192, intermediate 1536), fp32.
        per_layer = rank * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
        dense_pages = -(-per_layer * 4 // entry["page_bytes"])
        assert dense_pages <= len(entry["block_ids"]) <= dense_pages + 1, (entry, dense_pages)
    assert all(len(v) == 1 for v in blocks.values()), blocks  # same rank, same block count
    b8, b64 = blocks[8].pop(), blocks[64].pop()
    assert b64 >= 6 * b8, (b8, b64)
