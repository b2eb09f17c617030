"""Unified paging end to end: one engine, many adapters of mixed ranks, in the same steps.

Every request's greedy tokens must equal HF transformers + PEFT on the same weights
(requests without an adapter: plain HF), which is independent of the code under test.
"""

from __future__ import annotations

import pytest

from tests.engines import make_adapters_known
from tests.hf_reference import hf_greedy, trim_after_eos
from vllm_slora import trace

pytestmark = pytest.mark.engine

MAX_TOKENS = 8
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL = ATTN + MLP
# (rank, target modules, rslora): every rank of the issue, three target sets, rslora.
MIXED = [
    (r, targets, rslora)
    for r in (1, 4, 8, 12, 16, 32, 64)
    for targets, rslora in ((ALL, False), (ATTN, True), (("q_proj", "v_proj", "down_proj"), False))
][:21] + [(64, MLP, True), (12, ALL, True), (4, ("o_proj", "up_proj"), False)]
PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:",
    "def add(a, b):",
    "My favourite colour is",
]


@pytest.fixture(scope="module")
def mixed_adapters(default_model, tmp_path_factory):
    from vllm_slora.adapters.generate import generate_adapters

    root = tmp_path_factory.mktemp("mixed")
    adapters = []
    for i, (rank, targets, rslora) in enumerate(MIXED):
        (adapter,) = generate_adapters(
            default_model / "config.json", root, 1, ranks=(rank,), target_modules=targets,
            use_rslora=rslora, seed=100 + i, name_prefix=f"mix{i:02d}",
        )
        adapters.append(adapter)
    return adapters


@pytest.fixture(scope="module")
def tokenized(default_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model)
    return [tok(p)["input_ids"] for p in PROMPTS]


def _eos(default_model):
    import json

    eos = json.loads((default_model / "generation_config.json").read_text())["eos_token_id"]
    return set(eos if isinstance(eos, list) else [eos])


def test_mixed_batch_matches_hf_peft(slora_llm, default_model, mixed_adapters, tokenized, trace_file):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    jobs = []  # (adapter or None, prompt ids)
    for i, adapter in enumerate(mixed_adapters):
        jobs.append((adapter, tokenized[i % len(tokenized)]))
    for ids in tokenized[:3]:
        jobs.append((None, ids))
    loras = [
        LoRARequest(a.name, 1000 + i, a.path) if a else None for i, (a, _) in enumerate(jobs)
    ]
    make_adapters_known(slora_llm, [lora for lora in loras if lora])
    steps_before = len([e for e in trace.read(str(trace_file)) if e["event"] == "step"])
    outs = slora_llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for _, ids in jobs],
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
        lora_request=loras,
    )
    got = [list(o.outputs[0].token_ids) for o in outs]

    eos = _eos(default_model)
    for (adapter, ids), tokens in zip(jobs, got):
        want = hf_greedy(default_model, [ids], MAX_TOKENS, adapter_dir=adapter.path if adapter else None)[0]
        who = adapter.name if adapter else "base"
        assert trim_after_eos(tokens, eos) == trim_after_eos(want, eos), f"{who} differs from HF(+PEFT)"

    steps = [e for e in trace.read(str(trace_file)) if e["event"] == "step"][steps_before:]
    assert max(s["scheduled_adapters"] for s in steps) == len(mixed_adapters), (
        "all adapters should run in the same step"
    )


def test_same_name_reload_never_reuses_old_kv_or_pages(slora_llm, default_model, tokenized, tmp_path):
    """load_inplace with new files under the same name, id and path: new weights only.

    The prompt spans more than one KV block, so prefix caching would serve the second
    request from the first one's blocks if the hash ignored the adapter's files.
    """
    import os
    import shutil

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from vllm_slora.adapters.generate import generate_adapters

    (old,) = generate_adapters(default_model / "config.json", tmp_path / "old", 1, ranks=(16,), seed=1,
                             output_scale=2.0)
    (new,) = generate_adapters(default_model / "config.json", tmp_path / "new", 1, ranks=(16,), seed=2,
                             output_scale=2.0)
    path = tmp_path / "served"
    shutil.copytree(old.path, path)
    ids = (tokenized[0] + tokenized[1] + tokenized[2]) * 12  # > 128 tokens: at least one full block
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)

    def run(load_inplace: bool) -> list[int]:
        out = slora_llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False,
                                 lora_request=LoRARequest("reloaded", 4242, str(path), load_inplace=load_inplace))
        return list(out[0].outputs[0].token_ids)

    want_old = hf_greedy(default_model, [ids], MAX_TOKENS, adapter_dir=old.path)[0]
    want_new = hf_greedy(default_model, [ids], MAX_TOKENS, adapter_dir=new.path)[0]
    assert want_old != want_new, "the two adapters must disagree for this test to mean anything"
    eos = _eos(default_model)
    assert trim_after_eos(run(False), eos) == trim_after_eos(want_old, eos)

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(f"{new.path}/{name}", path / name)
        stat = os.stat(path / name)
        os.utime(path / name, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a visibly newer file
    assert trim_after_eos(run(True), eos) == trim_after_eos(want_new, eos), "served the old adapter's KV or pages"
