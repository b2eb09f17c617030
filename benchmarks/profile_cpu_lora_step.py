"""Where a decode step's LoRA time goes on CPU: the paged layers alone, no vLLM engine.

SmolLM2-135M shapes (30 layers x qkv/o/gate_up/down), N adapters of ranks 8/16/32/64 on
all 7 projections packed into a fake pool exactly as the worker packs them, T decode
tokens spread uniformly over the adapters (token i -> adapter i mod N). Times the LoRA
part of every layer (`PagedLoRALinear.add_lora`) against the base linears of the same
layers in the same run, for every CPU backend (native C++ kernel, torch path), and the
machine's plain read bandwidth measured in the same run (a sum over 512 MB), so the
LoRA part's effective read rate can be put against it; optionally prints a cProfile.

    .venv/bin/python benchmarks/profile_cpu_lora_step.py [--adapters 32] [--tokens 64] [--threads 2] [--profile]

Writes benchmarks/results/cpu_lora_step-<date>-<machine>.json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["native", "torch"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vllm_slora.adapters import BaseModelShape
    from vllm_slora.adapters.generate import generate_adapters
    from vllm_slora.bench.machine import machine_info, machine_tag
    from vllm_slora.model_prep import cache_root, prepare_default_model
    from vllm_slora.paged.layers import PagedLoRALinear, slice_out_sizes
    from vllm_slora.paged.manager import PagedAdapterManager
    from vllm_slora.step_plan import AdapterPlacement, SLoRAStepPlan

    model = prepare_default_model()
    base = BaseModelShape.from_hf_config(model / "config.json", dtype=torch.float32)
    adapters = generate_adapters(model / "config.json", cache_root() / "adapters" / "bench", args.adapters,
                                 ranks=(8, 16, 32, 64), seed=0)
    page_elems = 128 * base.num_kv_heads * base.head_dim * 2  # vLLM CPU block: 128 tokens, K and V
    from vllm_slora.paged.ops import cpu_native

    backends = [b for b in args.backends if b != "native" or cpu_native.available()]
    manager = PagedAdapterManager(base, torch.float32, "cpu", 8 << 30, max_num_tokens=8192,
                                  max_adapters_per_step=max(256, args.adapters), max_lora_rank=64)
    # Size the pool for every adapter (a probe manager computes each one's blocks), then
    # place them back to back.
    probe = PagedAdapterManager(base, torch.float32, "cpu", 1 << 20)
    probe.attach_pool([torch.zeros(page_elems)] * base.num_layers, page_elems)
    needs = [probe.host_cache.inspect(a.name, a.path).blocks_needed(page_elems) for a in adapters]
    manager.attach_pool([torch.zeros((1 + sum(needs)) * page_elems) for _ in range(base.num_layers)], page_elems)
    placed, next_block = [], 1
    for i, (a, need) in enumerate(zip(adapters, needs)):
        placed.append(AdapterPlacement(i + 1, a.name, a.path, 1, tuple(range(next_block, next_block + need))))
        next_block += need
    manager.apply_plan(SLoRAStepPlan(load=placed))
    token_ids = [1 + (i % args.adapters) for i in range(args.tokens)]

    class DenseLinear(torch.nn.Module):
        def __init__(self, inp: int, out: int) -> None:
            super().__init__()
            self.weight = torch.randn(out, inp) * 0.02
            self.output_size_per_partition = out

        def forward(self, x):
            return x @ self.weight.t(), None

    in_features = {"qkv_proj": base.hidden, "o_proj": base.num_heads * base.head_dim,
                   "gate_up_proj": base.hidden, "down_proj": base.intermediate}
    from vllm_slora.paged.backends import pick_backend

    def build_layers(backend) -> list:
        found = []
        for layer in range(base.num_layers):
            for module, inp in in_features.items():
                sizes = slice_out_sizes(base, module, 1, 0)
                wrapper = PagedLoRALinear(DenseLinear(inp, sum(sizes)), module, layer, sizes, manager.state, backend)
                found.append((wrapper, torch.randn(args.tokens, inp), torch.zeros(args.tokens, sum(sizes))))
        return found

    layers_of = {name: build_layers(pick_backend(name, "cpu")) for name in backends}
    layers = layers_of[backends[0]]

    def lora_step(name: str = backends[0]) -> None:
        manager.set_token_mapping(token_ids)
        for wrapper, x, out in layers_of[name]:
            wrapper.add_lora(x, out)

    def base_step() -> None:
        for wrapper, x, _ in layers:
            wrapper.base_layer(x)

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        return (time.perf_counter() - start) / args.repeats

    base_s = timed(base_step)
    lora_by_backend = {name: timed(lambda name=name: lora_step(name)) for name in backends}
    big = torch.ones(128 << 20)  # 512 MB of fp32
    read_gb_s = big.numel() * 4 / timed(lambda: big.sum()) / 1e9
    big = None  # free the 512 MB before the (optional) profile
    adapter_bytes = sum(a.rank for a in adapters) / len(adapters) * 4 * base.num_layers * sum(
        sum(base.features(p)) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    touched = min(args.adapters, args.tokens)
    step_bytes = adapter_bytes * touched
    result = {
        "machine": machine_info(),
        "config": {"model": model.name, "adapters": args.adapters, "tokens": args.tokens, "threads": args.threads,
                   "ranks": [8, 16, 32, 64], "dtype": "float32", "native_isa": cpu_native.isa()
                   if cpu_native.available() else None},
        "base_linears_ms_per_step": base_s * 1e3,
        "adapter_weight_bytes_read_per_step": step_bytes,
        "plain_read_gb_s": read_gb_s,
        "backends": {
            name: {"lora_ms_per_step": t * 1e3, "lora_over_base_linears": t / base_s,
                   "effective_read_gb_s": step_bytes / t / 1e9,
                   "fraction_of_read_bandwidth": step_bytes / t / 1e9 / read_gb_s}
            for name, t in lora_by_backend.items()
        },
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    path = RESULTS / f"cpu_lora_step-{stamp}-{machine_tag(result['machine'])}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path}")
    if args.profile:
        cProfile.runctx("lora_step(); lora_step()", globals(), locals(), "/tmp/cpu_lora_step.prof")
        pstats.Stats("/tmp/cpu_lora_step.prof").sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
