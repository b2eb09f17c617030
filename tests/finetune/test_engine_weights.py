"""The training forward inside a running engine, on the engine's own weights (#10).

One engine on the tiny model with slora.finetune=true: the worker RPC
`slora_training_logits` runs vllm_slora.finetune's functional forward on views of the
worker's parameters (the CPU backend keeps the dense linear weights only with the key,
patches/patch_cpu_gemm.py). Its logits must be HF+PEFT's, and its greedy tokens the
serving path's, for the same adapter and without one.
"""

from __future__ import annotations

import pytest
import torch

from tests.engines import close_llm, make_llm
from tests.finetune.peft_reference import load_hf

PROMPT_LEN = 24
ATOL = 1e-4  # fp32 everywhere; different GEMM kernels and summation orders only


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    from vllm_slora.adapters.generate import generate_adapters

    # output_scale=1.0: the adapter moves the logits as much as the base does, so a wrong
    # (or missing) LoRA term cannot hide inside the tolerance.
    (generated,) = generate_adapters(
        tiny_model / "config.json", tmp_path_factory.mktemp("ft-adapters"), 1, ranks=(8,), seed=31, output_scale=1.0
    )
    return generated


@pytest.fixture(scope="module")
def finetune_llm(tiny_model):
    llm = make_llm(tiny_model, slora={"finetune": True}, max_model_len=256)
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def prompt_ids(tiny_model) -> list[int]:
    from vllm_slora.finetune.model_config import DecoderConfig

    vocab = DecoderConfig.from_hf(tiny_model).vocab_size
    return torch.randint(3, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(7)).tolist()


def hf_logits(tiny_model, ids: list[int], adapter_dir: str | None) -> torch.Tensor:
    from peft import PeftModel

    model = load_hf(tiny_model)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def serving_path(llm, ids: list[int], lora_request) -> tuple[list[int], list[float], int]:
    """The serving path on the prompt: per position p >= 1, the greedy token after ids[:p] and
    the log-probability of ids[p]; then the generated (greedy) token."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    (out,) = llm.generate({"prompt_token_ids": ids}, params, lora_request=lora_request, use_tqdm=False)
    # prompt_logprobs[0] is None (nothing predicts the first token).
    entries = out.prompt_logprobs[1:]
    greedy = [next(token for token, logprob in entry.items() if logprob.rank == 1) for entry in entries]
    logprobs = [entry[token].logprob for entry, token in zip(entries, ids[1:])]
    return greedy, logprobs, out.outputs[0].token_ids[0]


@pytest.mark.engine
@pytest.mark.parametrize("with_adapter", [True, False], ids=["adapter", "base"])
def test_training_logits_on_engine_weights(finetune_llm, tiny_model, adapter, prompt_ids, with_adapter):
    """Logits of the training forward on the engine's parameters == HF(+PEFT) (fp32, atol 1e-4);
    its prompt log-probabilities == the serving path's, and its argmax == the serving path's
    greedy token at every position (same adapter, or none)."""
    from vllm.lora.request import LoRARequest

    adapter_dir = adapter.path if with_adapter else None
    (rows,) = finetune_llm.collective_rpc("slora_training_logits", args=(prompt_ids, adapter_dir))
    ours = torch.tensor(rows)
    ref = hf_logits(tiny_model, prompt_ids, adapter_dir)
    assert ours.shape == ref.shape == (PROMPT_LEN, ref.shape[-1])
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    if with_adapter:  # the adapter matters: a forward without it would fail the check above
        assert (hf_logits(tiny_model, prompt_ids, None) - ref).abs().max() > 100 * ATOL

    lora_request = LoRARequest(adapter.name, 1, adapter.path) if with_adapter else None
    served_greedy, served_logprobs, generated = serving_path(finetune_llm, prompt_ids, lora_request)
    logprobs = torch.log_softmax(ours, dim=-1)[:-1].gather(1, torch.tensor(prompt_ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(served_logprobs), logprobs, atol=ATOL, rtol=0)
    greedy = ours.argmax(-1).tolist()
    # Positions whose top-2 logits are closer than the tolerance could flip between kernels
    # (none here: the smallest gap is ~0.014).
    top2 = ours.topk(2, dim=-1).values
    decided = [(top2[p, 0] - top2[p, 1]).item() > 10 * ATOL for p in range(PROMPT_LEN)]
    assert sum(decided) >= PROMPT_LEN - 2
    assert [t for t, d in zip(served_greedy, decided) if d] == [t for t, d in zip(greedy[:-1], decided) if d]
    if decided[-1]:
        assert generated == greedy[-1]


def test_keep_dense_linear_weights_only_inside_the_context():
    """The patched dispatch keeps the dense weight only while the worker's context is active."""
    from vllm_slora.compat import cpu_gemm_utils
    from vllm_slora.patches import apply_patches
    from vllm_slora.patches.patch_cpu_gemm import keep_dense_linear_weights

    apply_patches("slora_finetune")
    apply_patches("slora_finetune")  # idempotent
    dispatch = cpu_gemm_utils().dispatch_cpu_unquantized_gemm

    def layer() -> torch.nn.Module:
        linear = torch.nn.Linear(64, 32, bias=False)
        linear.weight.requires_grad_(False)
        return linear

    with keep_dense_linear_weights():
        kept = layer()
        dense = kept.weight.detach().clone()
        dispatch(kept, remove_weight=True)
    assert torch.equal(kept.weight, dense)
    x = torch.randn(3, 64)
    torch.testing.assert_close(kept.cpu_linear(x, kept.weight, None), x @ dense.T)
    with keep_dense_linear_weights(False):
        dropped = layer()
        dispatch(dropped, remove_weight=True)
    stock = layer()
    dispatch(stock, remove_weight=True)
    # Outside the context the stock behaviour stands: the weight is dropped whenever a packed
    # kernel (oneDNN here, for fp32) took it; only the torch fallback keeps it.
    assert dropped.weight.numel() == stock.weight.numel()


def test_training_logits_refused_without_finetune_key():
    from vllm_slora.config import SLoRAConfig
    from vllm_slora.worker import SLoRACPUWorker

    worker = object.__new__(SLoRACPUWorker)  # no engine: the check comes before the model is read
    worker.slora_config = SLoRAConfig()
    with pytest.raises(RuntimeError, match="start the engine with slora.finetune=true"):
        worker.slora_training_logits([1, 2, 3], None)
