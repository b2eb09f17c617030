"""Co-served training gives its memory back under KV pressure (pool/training_loan.py), in a real
engine on the tiny model with a small KV pool: the jobs' layer graphs borrow pool blocks while
the KV cache can spare them; a burst of long requests calls them back (the requests all run,
with exactly the tokens they give with no job), and the loan returns once the burst is over."""

from __future__ import annotations

import time

import pytest

from tests.engines import close_llm, make_finetune_llm_in_pool
from tests.finetune.test_coserve_engine import engine_job, follow, utility
from tests.finetune.training_cases import write_training_file
from tests.tiny_model import tiny_kv_block_bytes
from vllm_slora.finetune.layer_units import activation_bytes
from vllm_slora.finetune.model_config import DecoderConfig
from vllm_slora.pool.training_loan import LEND_SHARE, SPARE_SHARE

pytestmark = pytest.mark.engine

BLOCK_SIZE = 32  # the CPU attention backend's smallest
POOL_BLOCKS = 160
BATCH_TOKENS = 40  # engine_job's micro-batches


def block_bytes() -> int:
    return tiny_kv_block_bytes(BLOCK_SIZE)


@pytest.fixture(scope="module")
def llm(tiny_model):
    engine = make_finetune_llm_in_pool(tiny_model, POOL_BLOCKS, block_bytes(), BLOCK_SIZE)
    yield engine
    close_llm(engine)


def wait_for(llm, condition, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = utility(llm, "stats", {})
        if condition(stats):
            return stats
        assert time.monotonic() < deadline, str(stats)
        time.sleep(0.05)


def test_graphs_borrow_pool_blocks_and_give_them_back_under_kv_pressure(llm, tiny_model, tmp_path):
    from vllm import SamplingParams

    # 18 requests of 200 distinct prompt tokens + 24 generated: 7 blocks each, 126 in all,
    # more than the pool keeps free beside the loan before it counts as KV pressure.
    prompts = [{"prompt_token_ids": [5 + (7 * i + 13 * j) % 200 for j in range(200)]} for i in range(18)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def run():
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    before = run()
    config = DecoderConfig.from_hf(tiny_model)
    wanted_blocks = -(-activation_bytes(BATCH_TOKENS, config, True, lora_rank=8) // block_bytes())  # engine_job: rank 8
    assert wanted_blocks < POOL_BLOCKS * (1 - LEND_SHARE)  # room to lend at rest
    per_request = -(-(200 + 24) // BLOCK_SIZE)
    assert 18 * per_request > POOL_BLOCKS * (1 - SPARE_SHARE) - wanted_blocks  # the burst is pressure

    job_id = engine_job(llm, tmp_path, "borrower", write_training_file(tmp_path / "train.jsonl"),
                        steps=10**6, publish_every=10**6, batch_tokens=BATCH_TOKENS)
    lent = wait_for(llm, lambda s: s["loan_blocks"] > 0)
    assert 0 < lent["loan_blocks"] <= wanted_blocks and lent["loan_recalls"] == 0
    assert lent["loan_bytes"] == lent["loan_blocks"] * block_bytes()

    during = run()
    after = utility(llm, "stats", {})
    assert during == before  # every request ran, token for token as with no job
    assert after["loan_recalls"] >= 1  # the KV cache took the blocks back

    # The burst is over: the loan comes back (maybe already during its last requests) and the
    # job trains on.
    back = wait_for(llm, lambda s: s["loan_blocks"] > 0)
    assert back["loans"] >= 2
    assert back["active"] == 1
    utility(llm, "cancel", {"job_id": job_id})
    status, events = follow(llm, job_id)
    assert status == "cancelled" and not any(e["kind"] == "failed" for e in events)
    kept = [(e["data"]["graph_layers"], e["data"]["layers"]) for e in events if e["kind"] == "step"]
    assert (config.num_layers, config.num_layers) in kept  # passes on the loan kept every layer's graph
    assert wait_for(llm, lambda s: s["loan_blocks"] == 0)["active"] == 0  # no job: nothing lent
