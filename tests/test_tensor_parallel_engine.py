"""TP=2 under the mp executor: S-LoRA sharding on the paged pool, end to end.

The tiny Llama (4 heads, 2 KV heads) splits over two CPU ranks. One mixed batch of
adapters with ranks {1, 4, 8, 12, 16, 32, 64} plus base requests must give the same
greedy tokens as HF transformers + PEFT and as the same engine at TP=1; each rank must
hold half of every adapter in the same number of blocks as TP=1.
"""

from __future__ import annotations

import pytest

from tests.engines import close_llm, make_llm
from tests.tp_batch import RANKS, assert_matches_hf_peft, generate, mixed_jobs

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tp_adapters(tiny_model, tmp_path_factory):
    from vllm_slora.adapters.generate import generate_adapters

    root = tmp_path_factory.mktemp("tp-engine-adapters")
    found = generate_adapters(tiny_model / "config.json", root, len(RANKS), ranks=RANKS, seed=21,
                              output_scale=1.0)
    # One attention-only rslora adapter: different slices are absent per module.
    found += generate_adapters(tiny_model / "config.json", root, 1, ranks=(12,), seed=22, use_rslora=True,
                               target_modules=("q_proj", "v_proj", "o_proj"), name_prefix="attn",
                               output_scale=1.0)
    return found


def run_batch(tiny_model, adapters, tp: int, monkeypatch):
    jobs = mixed_jobs(tiny_model, adapters)
    if tp > 1:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = make_llm(tiny_model, slora={}, max_model_len=256, tensor_parallel_size=tp,
                   distributed_executor_backend="mp")
    try:
        tokens = generate(llm, jobs)
        infos = llm.collective_rpc("slora_info")
    finally:
        close_llm(llm)
    return jobs, tokens, infos


@pytest.fixture(scope="module")
def runs(tiny_model, tp_adapters):
    mp = pytest.MonkeyPatch()
    try:
        return {tp: run_batch(tiny_model, tp_adapters, tp, mp) for tp in (1, 2)}
    finally:
        mp.undo()


def test_tp2_mixed_batch_matches_hf_peft_and_tp1(runs, tiny_model):
    jobs, tp2_tokens, _ = runs[2]
    _, tp1_tokens, _ = runs[1]
    assert tp2_tokens == tp1_tokens
    assert_matches_hf_peft(tiny_model, jobs, tp2_tokens, "at TP=2 (mp)")


def test_each_rank_holds_half_in_the_same_blocks(runs, tp_adapters):
    _, _, tp1 = runs[1]
    _, _, tp2 = runs[2]
    assert [i["rank"] for i in tp2] == [0, 1] and all(i["worker_cls"] == "SLoRACPUWorker" for i in tp2)
    single = tp1[0]["adapters"]
    assert len(single) == len(tp_adapters), "every adapter should still be resident after the batch"
    assert tp2[0]["adapters"][100]["page_bytes"] * 2 == single[100]["page_bytes"], "pages halve at TP=2"
    for lora_id, whole in single.items():
        rank0, rank1 = (info["adapters"][lora_id] for info in tp2)
        # One scheduler allocation for every rank: same block ids on both, as many as TP=1.
        assert rank0["block_ids"] == rank1["block_ids"]
        assert len(rank0["block_ids"]) == len(whole["block_ids"]) == whole["packed_pages"]
        if all(r % 2 == 0 for r in (RANKS + (12,))[lora_id - 100 : lora_id - 99]):
            assert rank0["shard_elements"] == rank1["shard_elements"] == whole["shard_elements"] // 2, whole["name"]
        else:  # rank 1: padded to 2 on column-parallel slices, so a bit more than half
            assert whole["shard_elements"] // 2 < rank0["shard_elements"] < whole["shard_elements"]
