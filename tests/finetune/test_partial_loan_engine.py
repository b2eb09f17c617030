"""A pool too small for a micro-batch's every layer graph lends part of them, end to end in a real
engine (pool/training_loan.py, finetune/layer_units.py): a 6-layer tiny model whose passes want
20-28 KV blocks of graphs, in a 20-block pool that can spare 12 beside its 37.5 % floor. Every
pass, the first included (its job waits one step for the loan), keeps some layers' graphs and
recomputes the others (what the job's step events report), and the job runs to its end."""

from __future__ import annotations

import pytest

from tests.engines import close_llm, make_finetune_llm_in_pool
from tests.finetune.test_coserve_engine import engine_job, follow, utility
from tests.finetune.training_cases import write_training_file
from tests.tiny_model import build_tiny_llama, tiny_kv_block_bytes
from vllm_slora.finetune.coserve_worker import BATCHES_FILE
from vllm_slora.finetune.layer_units import activation_bytes, layer_graph_bytes
from vllm_slora.finetune.model_config import DecoderConfig
from vllm_slora.finetune.packing import load_batches
from vllm_slora.pool.training_loan import LEND_SHARE

pytestmark = pytest.mark.engine

LAYERS = 6
BLOCK_SIZE = 32
POOL_BLOCKS = 20
JOB_RANK = 8  # engine_job's adapters


def block_bytes() -> int:
    return tiny_kv_block_bytes(BLOCK_SIZE, LAYERS)


@pytest.fixture(scope="module")
def deep_tiny_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny6") / "tiny-llama-6", num_layers=LAYERS)


@pytest.fixture(scope="module")
def llm(deep_tiny_model):
    engine = make_finetune_llm_in_pool(deep_tiny_model, POOL_BLOCKS, block_bytes(), BLOCK_SIZE)
    yield engine
    close_llm(engine)


def test_a_small_pool_lends_part_of_the_graphs_and_passes_keep_that_many_layers(llm, deep_tiny_model, tmp_path):
    config = DecoderConfig.from_hf(deep_tiny_model)
    assert config.num_layers == LAYERS
    job_id = engine_job(llm, tmp_path, "partial", write_training_file(tmp_path / "train.jsonl"), steps=6,
                        publish_every=6)
    batches = load_batches(tmp_path / "partial" / BATCHES_FILE)
    room = POOL_BLOCKS - 1 - int(POOL_BLOCKS * LEND_SHARE)  # free blocks (one is vLLM's null block) above the floor
    for batch in batches:  # the premise: room for part of every pass's graphs, more than two layers' worth
        wanted = -(-activation_bytes(batch.seq_lens, config, True, lora_rank=JOB_RANK) // block_bytes())
        assert 2 * layer_graph_bytes(batch.seq_lens, config, JOB_RANK) <= room * block_bytes() and room < wanted

    status, events = follow(llm, job_id)
    assert status == "succeeded", events[-3:]
    steps = [e["data"] for e in events if e["kind"] == "step"]
    assert len(steps) == 6
    kept = [(s["graph_layers"], s["layers"]) for s in steps]
    assert all(0 < layers_kept < LAYERS and layers == LAYERS for layers_kept, layers in kept), kept
    stats = utility(llm, "stats", {})
    assert stats["loans"] >= 1 and stats["loan_blocks"] == 0 and stats["active"] == 0  # recalled with the job gone
