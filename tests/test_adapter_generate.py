"""Synthetic adapters: PEFT format, loadable by PEFT, effective, deterministic."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from vllm_slora.adapters import SLICE_ORDER, generate_adapters
from vllm_slora.adapters.generate import main as generate_main

TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    out = tmp_path_factory.mktemp("generated")
    return generate_adapters(TINY_LLAMA, out, 2, ranks=(8, 16), seed=3)


def test_generated_files_are_peft_format(adapters):
    name, path, rank = adapters[1]
    assert (name, rank) == ("adapter-0001", 16)
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 16 and config["lora_alpha"] == 32  # default alpha = 2r
    assert config["target_modules"] == list(SLICE_ORDER)
    assert config["bias"] == "none" and config["use_dora"] is False and config["modules_to_save"] is None
    assert config["fan_in_fan_out"] is False and config["use_rslora"] is False
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * TINY_LLAMA["num_hidden_layers"]
    a = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert a.shape == (16, 64) and b.shape == (32, 16)  # k: 2 kv heads x head_dim 16
    assert b.abs().max() > 0, "B must be non-zero or correctness tests are vacuous"
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_generated_adapters_load_in_peft_and_change_logits(adapters):
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = tiny_llama()(ids).logits
    for name, path, rank in adapters:
        model = peft.PeftModel.from_pretrained(tiny_llama(), path).eval()
        tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
        for layer in range(TINY_LLAMA["num_hidden_layers"]):
            for proj in SLICE_ORDER:
                parent = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                module_name = f"model.layers.{layer}.{parent}.{proj}"
                module = model.base_model.model.get_submodule(module_name)
                key = f"base_model.model.{module_name}"
                assert torch.equal(module.lora_A["default"].weight, tensors[f"{key}.lora_A.weight"])
                assert torch.equal(module.lora_B["default"].weight, tensors[f"{key}.lora_B.weight"])
                assert module.r["default"] == rank
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.isfinite(logits).all()
        assert (logits - base_logits).abs().max() > 1e-2, f"{name} does not change the model"


def test_generation_is_idempotent_and_deterministic(tmp_path, adapters):
    first = generate_adapters(TINY_LLAMA, tmp_path, 2, ranks=(8, 16), seed=3)
    weights = os.path.join(first[0].path, "adapter_model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    again = generate_adapters(TINY_LLAMA, tmp_path, 3, ranks=(8, 16), seed=3)
    assert again[:2] == first and again[2].rank == 8
    assert os.stat(weights).st_mtime_ns == mtime, "an identical adapter was rewritten"
    # Same seed elsewhere -> identical weights; adapter i does not depend on N.
    reference = load_file(os.path.join(adapters[1].path, "adapter_model.safetensors"))
    same = load_file(os.path.join(first[1].path, "adapter_model.safetensors"))
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    # Different settings under the same name are regenerated.
    changed = generate_adapters(TINY_LLAMA, tmp_path, 1, ranks=(4,), seed=3)
    assert changed[0].rank == 4
    assert load_file(weights)["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape[0] == 4


def test_target_subset_patterns_dtype_and_random_ranks(tmp_path):
    adapters = generate_adapters(
        TINY_LLAMA, tmp_path, 4, ranks=(4, 8), target_modules=("q_proj", "down_proj"), lora_alpha=16,
        use_rslora=True, rank_choice="random", rank_pattern={"down_proj": 2}, dtype=torch.bfloat16, seed=9,
    )
    assert {a.rank for a in adapters} <= {4, 8}
    tensors = load_file(os.path.join(adapters[0].path, "adapter_model.safetensors"))
    assert {k.split(".")[-3] for k in tensors} == {"q_proj", "down_proj"}
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (2, 128)


def test_cli(tmp_path, capsys):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(TINY_LLAMA))
    generate_main([str(config_path), str(tmp_path / "out"), "-n", "2", "--ranks", "4", "--target-modules", "v_proj"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["adapter-0000", "4"], ["adapter-0001", "4"]]


# -- `vllm-slora adapters` / `demo`: every bad argument is one line and a non-zero exit ------

@pytest.fixture
def tiny_base(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(TINY_LLAMA))
    return base


def run_cli(argv, capsys):
    from vllm_slora.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--targets", "lm_head"], "invalid choice: 'lm_head'"),
        (["--alpha", "0"], "--alpha: must be a finite number > 0"),
        (["--alpha", "nan"], "--alpha: must be a finite number > 0"),
        (["--ranks", "0"], "--ranks: must be at least 1, got 0"),
        (["--ranks", "8", "-4"], "--ranks: must be at least 1, got -4"),
        (["--num", "0"], "--num: must be at least 1, got 0"),
        (["--num", "x"], "--num: 'x' is not an integer"),
        (["--base", "/nonexistent"], "--base /nonexistent: no such model folder or config.json"),
    ],
)
def test_adapters_cli_refuses_bad_arguments_in_one_line(tmp_path, tiny_base, capsys, args, needle):
    argv = ["adapters", "--out", str(tmp_path / "out")]
    if "--base" not in args:
        argv += ["--base", str(tiny_base)]
    code, out, err = run_cli(argv + args, capsys)
    assert code != 0 and needle in err, (code, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_adapters_cli_refuses_a_base_that_is_not_a_llama_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    code, _, err = run_cli(["adapters", "--out", str(tmp_path / "out"), "--base", str(tmp_path)], capsys)
    assert code == 1 and "not a Llama-family model config (no 'num_attention_heads')" in err, err
    assert len(err.strip().splitlines()) == 1


def test_adapters_cli_does_not_overwrite_without_force(tmp_path, tiny_base, capsys):
    argv = ["adapters", "--out", str(tmp_path / "out"), "--base", str(tiny_base), "--num", "2", "--ranks", "4"]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and len(out.strip().splitlines()) == 2
    weights = tmp_path / "out" / "adapter-0000" / "adapter_model.safetensors"
    before = weights.read_bytes()
    assert run_cli(argv, capsys)[0] == 0  # the same settings again: nothing to overwrite
    code, _, err = run_cli([*argv[:-1], "8"], capsys)  # other ranks into the same folder
    assert code == 1 and "already holds an adapter written with other settings" in err and "--force" in err
    assert weights.read_bytes() == before
    code, out, _ = run_cli([*argv[:-1], "8", "--force"], capsys)
    assert code == 0 and weights.read_bytes() != before


def test_every_cli_option_has_help():
    from vllm_slora.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name in ("prepare", "adapters", "demo"):
        for action in subparsers.choices[name]._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


@pytest.mark.parametrize("port, needle", [("99999", "must be a TCP port in 1..65535"), ("0", "must be at least 1")])
def test_demo_port_is_checked_before_anything_starts(capsys, monkeypatch, port, needle):
    import vllm_slora.demo

    monkeypatch.setattr(vllm_slora.demo, "run_demo", lambda *a: pytest.fail("the demo started"))
    code, _, err = run_cli(["demo", "--port", port], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_demo_port_in_use_is_refused_before_loading(capsys, monkeypatch):
    import socket

    import vllm_slora.demo

    monkeypatch.setattr(vllm_slora.demo, "run_demo", lambda *a: pytest.fail("the demo started"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        code, _, err = run_cli(["demo", "--port", str(sock.getsockname()[1])], capsys)
    assert code == 1 and "cannot be used" in err and len(err.strip().splitlines()) == 1, err
