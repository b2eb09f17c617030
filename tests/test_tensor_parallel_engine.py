"""TP=2 under the mp executor: S-LoRA sharding on the paged pool, end to end.

The tiny Llama (4 heads, 2 KV heads) splits over two CPU ranks. One mixed batch of
adapters with ranks {1, 4, 8, 12, 16, 32, 64} plus base requests must give the same
greedy tokens as HF transformers + PEFT and as the same engine at TP=1; each rank must
hold half of every adapter in the same number of blocks as TP=1.
"""

from __future__ import annotations

import pytest

from tests.conftest import close_llm, make_llm
from tests.hf_reference import hf_greedy, trim_after_eos

pytestmark = pytest.mark.engine

RANKS = (1, 4, 8, 12, 16, 32, 64)
MAX_TOKENS = 6
PROMPTS = ["the quick brown fox", "paris is the capital of", "many adapters share one base model",
           "a stitch in time"]


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
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    jobs = [(a, prompts[i % len(prompts)]) for i, a in enumerate(adapters)] + [(None, p) for p in prompts[:2]]
    if tp > 1:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = make_llm(tiny_model, slora={}, max_model_len=256, tensor_parallel_size=tp,
                   distributed_executor_backend="mp")
    try:
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for _, ids in jobs],
            SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
            lora_request=[LoRARequest(a.name, 100 + i, a.path) if a else None for i, (a, _) in enumerate(jobs)],
        )
        tokens = [list(o.outputs[0].token_ids) for o in outs]
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
    import json

    eos = json.loads((tiny_model / "config.json").read_text()).get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos])
    jobs, tp2_tokens, _ = runs[2]
    _, tp1_tokens, _ = runs[1]
    assert tp2_tokens == tp1_tokens
    changed = 0
    for (adapter, ids), got in zip(jobs, tp2_tokens):
        want = hf_greedy(tiny_model, [ids], MAX_TOKENS, adapter_dir=adapter.path if adapter else None)[0]
        who = adapter.name if adapter else "base"
        assert trim_after_eos(got, eos) == trim_after_eos(want, eos), f"{who} at TP=2 differs from HF+PEFT"
        changed += adapter is not None and want != hf_greedy(tiny_model, [ids], MAX_TOKENS)[0]
    # The comparison only means something if the adapters move the greedy tokens.
    assert changed >= len(jobs) // 2, f"only {changed} adapters change the base model's tokens"


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
