"""TP=2 under the Ray executor on this CPU host: S-LoRA sharding, end to end.

Stock vLLM refuses Ray on the CPU platform; patches/patch_cpu_ray.py swaps in a RayExecutorV2
subclass that reserves one {"CPU": 1} placement-group bundle per rank. The two TP ranks
are then real Ray actors (started by a local Ray cluster in EngineCore), fed by the same
message queues as the mp executor. One mixed batch of adapters with ranks
{1, 4, 8, 12, 16, 32, 64} plus base requests must give the same greedy tokens as HF
transformers + PEFT, and each rank must report that it runs inside a Ray actor.
"""

from __future__ import annotations

import pytest

from tests.engines import close_llm, make_llm
from tests.tp_batch import RANKS, assert_matches_hf_peft, generate, mixed_jobs

pytestmark = [pytest.mark.engine]


@pytest.fixture(scope="module")
def ray_run(tiny_model, tmp_path_factory):
    pytest.importorskip("ray")
    from vllm_slora.adapters.generate import generate_adapters

    adapters = generate_adapters(tiny_model / "config.json", tmp_path_factory.mktemp("ray-adapters"),
                                 len(RANKS), ranks=RANKS, seed=31, output_scale=1.0)
    jobs = mixed_jobs(tiny_model, adapters)

    mp = pytest.MonkeyPatch()
    try:
        # No manual patching: vllm_slora.register() (run by vLLM's plugin loader) applies
        # patches/patch_cpu_ray.py, which is what this test proves works.
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        # Lets collective_rpc ship the probe function below to the workers.
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        llm = make_llm(tiny_model, slora={}, max_model_len=256, tensor_parallel_size=2,
                       distributed_executor_backend="ray")
        try:
            backend = llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
            tokens = generate(llm, jobs)
            where = llm.collective_rpc(_where_am_i())
            infos = llm.collective_rpc("slora_info")
        finally:
            close_llm(llm)
    finally:
        mp.undo()
    return dict(jobs=jobs, tokens=tokens, where=where, infos=infos, backend=backend)


def _where_am_i():
    """A probe for collective_rpc: each TP worker reports the Ray actor it lives in, if any.

    Built in a closure so cloudpickle ships it by value (the actors need not import tests/).
    """

    def probe(worker) -> dict:
        import os

        import ray

        found = {"rank": worker.rank, "pid": os.getpid(), "ray": ray.is_initialized()}
        with open(f"/proc/{os.getppid()}/comm") as f:
            found["parent"] = f.read().strip()
        if found["ray"]:
            ctx = ray.get_runtime_context()
            found.update(actor_id=ctx.get_actor_id(), actor_name=ctx.get_actor_name(),
                         placement_group=ctx.get_placement_group_id())
        return found

    return probe


def test_workers_are_ray_actors_in_one_placement_group(ray_run):
    backend = ray_run["backend"]
    assert isinstance(backend, type) and backend.__name__ == "CpuRayExecutor" and backend.uses_ray
    where = ray_run["where"]
    assert [w["rank"] for w in where] == [0, 1]
    assert len({w["pid"] for w in where}) == 2
    for w in where:
        assert w["ray"] and w["actor_id"], f"rank {w['rank']} is not a Ray actor: {w}"
        assert w["actor_name"].startswith("vllm_Worker_") and w["actor_name"].endswith(f"_TP{w['rank']}")
        assert w["parent"] == "raylet", f"rank {w['rank']} was not started by Ray: {w}"
    pgs = {w["placement_group"] for w in where}
    assert len(pgs) == 1 and None not in pgs, f"ranks not in one placement group: {pgs}"
    assert all(i["worker_cls"] == "SLoRACPUWorker" for i in ray_run["infos"])


def test_tp2_ray_mixed_batch_matches_hf_peft(ray_run, tiny_model):
    assert_matches_hf_peft(tiny_model, ray_run["jobs"], ray_run["tokens"], "under Ray TP=2")
    # Every adapter was paged in on both ranks, in the same blocks.
    rank0, rank1 = (info["adapters"] for info in ray_run["infos"])
    assert set(rank0) == set(rank1) == {100 + i for i in range(len(RANKS))}
    assert all(rank0[k]["block_ids"] == rank1[k]["block_ids"] for k in rank0)
