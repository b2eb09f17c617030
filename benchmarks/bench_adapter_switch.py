"""Resident adapter switch cost: µs per adapter per step with 1,000 resident adapters.

What it measures. With unified paging every resident adapter's weights already sit in
pool pages, so an engine step that runs a different set of adapters copies no weight
at all. The only per-step work that depends on which adapters run is the worker's
metadata update, `PagedAdapterManager.set_token_mapping(token_lora_mapping)`
(vllm_slora/paged/manager.py): it maps each token's lora_int_id to a step slot through
`StepMetadata.assign_slots` (vllm_slora/paged/step_metadata.py), which, for the adapters
that are not already in a slot, picks the least recently used slots and writes those
adapters' page-table rows (pool offsets of their A / B^T rows, ranks, scalings) into the
static per-step tables, all of them with one copy per table, then writes the token->slot map. That call, timed alone, is the
switch cost: the forward reads the same static tables whichever adapters they hold.

Set-up (no engine, the same path the worker runs): a `PagedAdapterManager` with
`kernel_backend="torch"` on CPU, 256 step slots (`max_adapters_per_step`, vLLM's
--max-loras), `max_lora_rank=16`, a flat per-layer pool big enough for all 1,000
generated PEFT adapters (ranks 8/16 alternating, all seven projections), every one
made resident through the scheduler's plan path (`apply_plan(SLoRAStepPlan(load=...))`,
distinct blocks each). Two model shapes:

* ``tiny``: the tiny test Llama (tests/tiny_model.py: 2 layers, hidden 128), fp32;
* ``deep32``: the same family at Llama-7B/8B depth, 32 layers, but narrow (hidden 32)
  and fp16 so that 1,000 adapters fit on disk and in memory. The table rows written
  per switched adapter are [layers, slices, rank] offsets, so their size depends on
  depth and rank, not on the hidden size: this is the table-write cost of a 32-layer model.

Each step is a batch of k distinct adapters (k = 1, 8, 32, 128, 256; one request per
adapter) with T tokens: ``decode`` (one token per request, T = k) and ``prefill16``
(16 tokens per request, T = 16 k). Per repetition, on the same T:

* ``switch``: a fresh random k-set drawn from the 1,000 (so the tables really change;
  the ones that still happen to sit in a slot from earlier steps cost no write);
* ``switch_all_new``: a random k-set of adapters that are in no slot (every one written);
* ``steady``: the same k-set as the previous step (no table write: the resident,
  unchanged baseline);
* ``none``: T tokens, all lora_int_id 0 (no adapter at all).

Reported: median (p10/p90) µs per step, median µs per adapter per step (step / k), the
table writes per step, and the marginal µs per table write ((switch_all_new - steady) / k).
A separate instrumented pass splits the switch step into slot choice (`_free_slots`) and
table writes (`_write`). GC is off while timing.

Stock vLLM, for contrast (an emulation, labelled so in the output): stock vLLM has
``max_loras`` slots of stacked weight tensors; activating an adapter that is not in a
slot runs ``set_lora`` per LoRA layer: ``reset_lora`` zeroes the slot's A and B of
every slice, then copies the adapter's A and B into it
(vllm/lora/layers/base_linear.py). Timed here as exactly those zero + copy calls on
preallocated CPU tensors of the same shapes and dtype (A [slots, 1, max_rank, in], B
[slots, 1, out, max_rank] per slice), per adapter; it leaves out vLLM's Python
bookkeeping and punica metadata, and on a GPU it would be a host->device copy. Adapters
already in one of stock's slots switch with metadata only, like ``steady`` here.

Reference from the issue: Lamini reports 2.93 µs per adapter per step with 1,000
resident adapters (their hardware and stack; not measured here).

Command (about 2 minutes on 2 CPU cores; generated adapters are cached under --work-dir):

    .venv/bin/python benchmarks/bench_adapter_switch.py

Writes benchmarks/results/adapter_switch-<YYYYMMDD>-<machine_tag>.json and .png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors import safe_open  # noqa: E402

from tests.tiny_model import TINY_LLAMA  # noqa: E402
from vllm_slora.adapters import BaseModelShape  # noqa: E402
from vllm_slora.adapters.generate import generate_adapters  # noqa: E402
from vllm_slora.adapters.modules import SLICE_ORDER  # noqa: E402
from vllm_slora.bench.machine import machine_info, machine_tag  # noqa: E402
from vllm_slora.paged.manager import PagedAdapterManager  # noqa: E402
from vllm_slora.paged.modules import PAGED_MODULES  # noqa: E402
from vllm_slora.step_plan import AdapterPlacement, SLoRAStepPlan  # noqa: E402

LAMINI_US_PER_ADAPTER_STEP = 2.93
CONDITIONS = ("switch", "switch_all_new", "steady", "none")
SHAPES = {
    # The tiny test Llama, as the engine tests build it (tests/tiny_model.py).
    "tiny": dict(config=dict(TINY_LLAMA, vocab_size=512), dtype=torch.float32,
                 # One vLLM KV block of this model: 128 tokens x 2 KV heads x 32 x (K, V).
                 page_elems=16384),
    # Llama-7B/8B depth, narrow widths (see the module docstring).
    "deep32": dict(config=dict(TINY_LLAMA, vocab_size=512, num_hidden_layers=32, hidden_size=32,
                               intermediate_size=64, num_attention_heads=1, num_key_value_heads=1),
                   dtype=torch.float16, page_elems=2048),
}


# -- set-up ---------------------------------------------------------------------------
def build_manager(shape: dict, adapters, args) -> tuple[PagedAdapterManager, dict]:
    """A worker manager with all adapters resident in one pool; returns (manager, setup info)."""
    base = BaseModelShape.from_hf_config(shape["config"], dtype=shape["dtype"])
    page_elems = shape["page_elems"]
    manager = PagedAdapterManager(
        base, shape["dtype"], "cpu", args.host_cache_mib << 20, max_lora_rank=max(args.ranks),
        max_num_tokens=args.prefill_tokens * args.max_adapters_per_step,
        max_adapters_per_step=args.max_adapters_per_step, kernel_backend="torch",
    )
    # Size the pool from the real layouts: block 0 stays unused, as in the engine.
    # A one-page stand-in pool first: the host cache (which reads the layouts) comes with a pool.
    manager.attach_pool([torch.zeros(page_elems, dtype=shape["dtype"])] * base.num_layers, page_elems)
    specs = [manager.host_cache.inspect(a.name, str(a.path)) for a in adapters]
    needs = [spec.blocks_needed(page_elems) for spec in specs]
    num_blocks = 1 + sum(needs)
    storage = torch.zeros(base.num_layers * num_blocks * page_elems, dtype=shape["dtype"])
    per_layer = num_blocks * page_elems
    manager.attach_pool([storage[i * per_layer:(i + 1) * per_layer] for i in range(base.num_layers)], page_elems)
    started = time.perf_counter()
    next_block, placements = 1, []
    for i, (adapter, spec, need) in enumerate(zip(adapters, specs, needs)):
        blocks = tuple(range(next_block, next_block + need))
        next_block += need
        placements.append(AdapterPlacement(i + 1, adapter.name, str(adapter.path), 1, blocks, files=spec.files))
    for lo in range(0, len(placements), 100):
        manager.apply_plan(SLoRAStepPlan(load=placements[lo:lo + 100]))
    report = manager.take_report()
    if report.failed or len(manager.resident) != len(adapters):
        raise RuntimeError(f"not every adapter became resident: {len(manager.resident)}, failed {report.failed}")
    return manager, dict(
        num_layers=base.num_layers, hidden=base.hidden, intermediate=base.intermediate,
        dtype=str(shape["dtype"]).removeprefix("torch."), page_elems=page_elems, pool_blocks=num_blocks,
        pool_mib=round(storage.numel() * storage.element_size() / 2**20, 1),
        blocks_per_adapter={str(r): sorted({n for n, a in zip(needs, adapters) if a.rank == r}) for r in args.ranks},
        load_seconds=round(time.perf_counter() - started, 2),
        table_row_width=manager.state.max_rows,
    )


# -- the timed call -------------------------------------------------------------------
def timed(manager: PagedAdapterManager, ids: np.ndarray) -> tuple[float, int]:
    """(µs, table writes) of one set_token_mapping call."""
    writes = manager.state.table_writes
    started = time.perf_counter_ns()
    manager.set_token_mapping(ids)
    elapsed = (time.perf_counter_ns() - started) / 1e3
    return elapsed, manager.state.table_writes - writes


def check_step(manager: PagedAdapterManager, ids: np.ndarray) -> None:
    """Every token's slot holds its adapter (outside the timing)."""
    slots = manager.state.token_adapter[: ids.size].tolist()
    content = manager.state._content
    for lora_int_id, slot in zip(ids.tolist(), slots):
        got = -1 if slot < 0 else content[slot].lora_int_id
        assert (lora_int_id == 0 and slot == -1) or got == lora_int_id, (lora_int_id, slot, got)


def summary(values: list[float]) -> dict:
    q = np.percentile(values, [10, 50, 90])
    return dict(median=round(float(q[1]), 2), p10=round(float(q[0]), 2), p90=round(float(q[2]), 2),
                mean=round(statistics.fmean(values), 2))


def measure(manager: PagedAdapterManager, num_adapters: int, k: int, tokens_per_request: int, reps: int,
            rng: np.random.Generator) -> dict:
    ids_all = np.arange(1, num_adapters + 1)
    times = {c: [] for c in CONDITIONS}
    writes = {c: [] for c in CONDITIONS}
    none_ids = np.zeros(k * tokens_per_request, dtype=np.int64)
    warmup = args_warmup(reps)
    for rep in range(reps + warmup):
        record = rep >= warmup
        for switch in ("switch", "switch_all_new"):
            if switch == "switch":
                chosen = rng.choice(ids_all, size=k, replace=False)
            else:  # drawn after the previous steps: none of these holds a slot now
                outside = np.setdiff1d(ids_all, np.fromiter(manager.state.slot_of, dtype=np.int64))
                chosen = rng.choice(outside, size=k, replace=False)
            steps = [(switch, np.repeat(chosen, tokens_per_request)),
                     ("steady", np.repeat(chosen, tokens_per_request)),
                     ("none", none_ids.copy())]
            for condition, ids in steps:
                elapsed, wrote = timed(manager, ids)
                if record:
                    times[condition].append(elapsed)
                    writes[condition].append(wrote)
                if rep % 25 == 0:
                    check_step(manager, ids)
    assert all(w == 0 for w in writes["steady"] + writes["none"]), "a steady step rewrote tables"
    assert all(w == k for w in writes["switch_all_new"]), "an all-new step skipped a write"
    out = {}
    for condition in CONDITIONS:
        s = summary(times[condition])
        out[condition] = dict(us_per_step=s, us_per_adapter_step=round(s["median"] / k, 3),
                              table_writes_per_step=round(statistics.fmean(writes[condition]), 2),
                              samples=len(times[condition]))
    out["marginal_us_per_table_write"] = round(
        (out["switch_all_new"]["us_per_step"]["median"] - out["steady"]["us_per_step"]["median"]) / k, 3)
    out["switch_minus_steady_us_per_adapter"] = round(
        (out["switch"]["us_per_step"]["median"] - out["steady"]["us_per_step"]["median"]) / k, 3)
    return out


def args_warmup(reps: int) -> int:
    return max(3, reps // 20)


def breakdown(manager: PagedAdapterManager, num_adapters: int, k: int, reps: int, rng: np.random.Generator) -> dict:
    """Where an all-new decode step goes: slot choice vs table writes (instrumented, so slower)."""
    state = manager.state
    spent = {"_free_slots": 0.0, "_write": 0.0}
    originals = {name: getattr(state, name) for name in spent}

    def wrap(name):
        inner = originals[name]

        def run(*a, **kw):
            started = time.perf_counter_ns()
            try:
                return inner(*a, **kw)
            finally:
                spent[name] += time.perf_counter_ns() - started
        return run

    ids_all = np.arange(1, num_adapters + 1)
    total = 0.0
    for name in spent:
        setattr(state, name, wrap(name))
    try:
        for _ in range(reps):
            outside = np.setdiff1d(ids_all, np.fromiter(state.slot_of, dtype=np.int64))
            elapsed, _ = timed(manager, rng.choice(outside, size=k, replace=False))
            total += elapsed * 1e3
    finally:
        for name in spent:
            delattr(state, name)  # back to the class methods
    return dict(k=k, steps=reps, us_per_step=round(total / reps / 1e3, 1),
                **{f"{name.strip('_')}_share": round(ns / total, 3) for name, ns in spent.items()},
                **{f"{name.strip('_')}_us_per_adapter": round(ns / reps / k / 1e3, 2) for name, ns in spent.items()})


# -- stock vLLM emulation -----------------------------------------------------------------
def stock_set_lora(shape: dict, adapters, args, rng: np.random.Generator) -> dict:
    """µs to put one non-resident adapter into a stock vLLM slot: reset_lora + A/B copies."""
    base = BaseModelShape.from_hf_config(shape["config"], dtype=shape["dtype"])
    dtype, max_rank, slots = shape["dtype"], max(args.ranks), args.stock_slots
    # Per layer, per module, per slice: A [slots, 1, max_rank, in], B [slots, 1, out, max_rank].
    stacked = [{module: [(torch.zeros(slots, 1, max_rank, base.features(p)[0], dtype=dtype),
                          torch.zeros(slots, 1, base.features(p)[1], max_rank, dtype=dtype)) for p in projections]
                for module, projections in PAGED_MODULES.items()} for _ in range(base.num_layers)]
    # Stock keeps registered adapters in CPU memory (its LoRAModel cache), B pre-scaled.
    cached = []
    for adapter in adapters[: args.stock_adapters]:
        weights = {}
        with safe_open(str(Path(adapter.path) / "adapter_model.safetensors"), framework="pt") as f:
            for layer in range(base.num_layers):
                for proj in SLICE_ORDER:
                    parent = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                    key = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
                    weights[layer, proj] = (f.get_tensor(f"{key}.lora_A.weight").to(dtype),
                                            (f.get_tensor(f"{key}.lora_B.weight") * 2.0).to(dtype))
        cached.append(weights)

    def set_lora(index: int, weights: dict) -> None:
        for layer, modules in enumerate(stacked):
            for module, projections in PAGED_MODULES.items():
                pairs = modules[module]
                for a_stacked, b_stacked in pairs:  # reset_lora
                    a_stacked[index] = 0
                    b_stacked[index] = 0
                for (a_stacked, b_stacked), proj in zip(pairs, projections):
                    a, b = weights[layer, proj]
                    a_stacked[index, 0, : a.shape[0], : a.shape[1]].copy_(a, non_blocking=True)
                    b_stacked[index, 0, : b.shape[0], : b.shape[1]].copy_(b, non_blocking=True)

    times = []
    for rep in range(args.stock_reps + 10):
        weights = cached[int(rng.integers(len(cached)))]
        started = time.perf_counter_ns()
        set_lora(rep % slots, weights)
        if rep >= 10:
            times.append((time.perf_counter_ns() - started) / 1e3)
    bytes_copied = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in cached[0].values())
    slot_bytes = sum(a[0].numel() * a.element_size() + b[0].numel() * b.element_size()
                     for modules in stacked for pairs in modules.values() for a, b in pairs)
    return dict(
        label="EMULATION of stock vLLM set_lora (reset_lora + A/B copy into preallocated CPU slot tensors); "
              "not a stock vLLM run",
        us_per_adapter_switch=summary(times), slots=slots, max_lora_rank=max_rank,
        adapters_cycled=len(cached), first_adapter_rank=adapters[0].rank,
        bytes_copied_first_adapter=bytes_copied, slot_bytes_zeroed=slot_bytes,
    )


# -- output -------------------------------------------------------------------------------
def print_table(shape_name: str, results: dict, ks: list[int], stock: dict | None) -> None:
    print(f"\n== {shape_name}: {results['setup']['num_layers']} layers, 1 request per adapter; "
          f"µs per step median [p10-p90] | µs per adapter per step (step / k) | table writes per step")
    header = f"{'mode':<10}{'k':>5}{'T':>6}  " + "".join(f"{c:>34}" for c in CONDITIONS) + f"{'µs/write':>10}"
    print(header)
    for mode, by_k in results["modes"].items():
        for k in ks:
            r = by_k[str(k)]
            cells = []
            for c in CONDITIONS:
                s = r[c]["us_per_step"]
                cells.append(f"{s['median']:9.1f} [{s['p10']:.0f}-{s['p90']:.0f}] |{r[c]['us_per_adapter_step']:7.2f}"
                             f" |{r[c]['table_writes_per_step']:6.1f}")
            print(f"{mode:<10}{k:>5}{r['tokens']:>6}  " + "".join(f"{c:>34}" for c in cells)
                  + f"{r['marginal_us_per_table_write']:>10.2f}")
    b = results["breakdown"]
    print(f"breakdown (all-new decode, k={b['k']}, instrumented): {b['us_per_step']} µs/step; slot choice "
          f"{b['free_slots_share']:.0%} ({b['free_slots_us_per_adapter']} µs/adapter), table writes "
          f"{b['write_share']:.0%} ({b['write_us_per_adapter']} µs/adapter)")
    if stock:
        s = stock["us_per_adapter_switch"]
        print(f"stock vLLM set_lora EMULATION: {s['median']:.1f} µs per non-resident adapter switched "
              f"[{s['p10']:.0f}-{s['p90']:.0f}] ({stock['bytes_copied_first_adapter'] / 1024:.0f} KiB copied, "
              f"{stock['slot_bytes_zeroed'] / 1024:.0f} KiB zeroed)")
    print(f"reference: Lamini {LAMINI_US_PER_ADAPTER_STEP} µs per adapter per step (issue)")


def plot(path: Path, all_results: dict, ks: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(6.5 * len(all_results), 5.6), squeeze=False)
    styles = {"switch": ("tab:red", "o"), "switch_all_new": ("tab:purple", "s"), "steady": ("tab:green", "^"),
              "none": ("tab:gray", "x")}
    for ax, (shape_name, results) in zip(axes[0], all_results.items()):
        for mode, dash in (("decode", "-"), ("prefill16", "--")):
            for condition, (color, marker) in styles.items():
                ys = [results["modes"][mode][str(k)][condition]["us_per_adapter_step"] for k in ks]
                ax.plot(ks, ys, dash, color=color, marker=marker, label=f"{condition}, {mode}")
        stock = results.get("stock_emulation")
        if stock:
            ax.axhline(stock["us_per_adapter_switch"]["median"], color="tab:orange", ls=":",
                       label="stock vLLM set_lora copy (emulated), per new adapter")
        ax.axhline(LAMINI_US_PER_ADAPTER_STEP, color="black", ls="-.", lw=1, label="Lamini 2.93 µs (reference)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("distinct adapters in the step (k)")
        ax.set_ylabel("µs per adapter per step (median step / k)")
        setup = results["setup"]
        ax.set_title(f"{shape_name}: {setup['num_layers']} layers, {setup['dtype']}, 1,000 resident, "
                     f"{setup['slots']} slots", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.suptitle("vllm-slora set_token_mapping: resident adapter switch cost (CPU)", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,deep32", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--num-adapters", type=int, default=1000)
    parser.add_argument("--ranks", default="8,16")
    parser.add_argument("--ks", default="1,8,32,128,256")
    parser.add_argument("--max-adapters-per-step", type=int, default=256)
    parser.add_argument("--prefill-tokens", type=int, default=16, help="tokens per request in the prefill mode")
    parser.add_argument("--reps", type=int, default=200,
                        help="timed repetitions per (k, mode) for k <= 32; scaled down (>= 60) above")
    parser.add_argument("--host-cache-mib", type=int, default=256)
    parser.add_argument("--stock-slots", type=int, default=8, help="stock vLLM max_loras in the emulation")
    parser.add_argument("--stock-adapters", type=int, default=16)
    parser.add_argument("--stock-reps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "vllm_slora_bench_adapter_switch"),
                        help="where the generated adapters are written (reused between runs)")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    args.ranks = tuple(int(r) for r in args.ranks.split(","))
    ks = [min(int(k), args.max_adapters_per_step) for k in args.ks.split(",")]
    ks = sorted(set(ks))
    info = machine_info()
    load_before = os.getloadavg()  # other work on the machine skews host-side timings
    torch.set_num_threads(1)  # the worker's metadata path is single-threaded host code
    all_results = {}
    began = time.perf_counter()
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        t0 = time.perf_counter()
        adapters = generate_adapters(shape["config"], Path(args.work_dir) / shape_name, args.num_adapters,
                                     ranks=args.ranks, seed=args.seed, dtype=shape["dtype"])
        generate_s = time.perf_counter() - t0
        manager, setup = build_manager(shape, adapters, args)
        setup.update(generate_seconds=round(generate_s, 2), slots=args.max_adapters_per_step,
                     num_adapters=len(adapters), ranks=list(args.ranks))
        print(f"[{shape_name}] {len(adapters)} adapters resident in {setup['pool_blocks']} blocks "
              f"({setup['pool_mib']} MiB pool; generate {generate_s:.1f} s, load {setup['load_seconds']} s)",
              flush=True)
        rng = np.random.default_rng(args.seed)
        modes = {}
        gc.collect()
        gc.disable()
        try:
            for mode, tokens_per_request in (("decode", 1), ("prefill16", args.prefill_tokens)):
                modes[mode] = {}
                for k in ks:
                    # Fewer repetitions for the big steps (each is tens of ms), never under 60.
                    reps = args.reps if k <= 32 else max(60, args.reps * 32 // k)
                    r = measure(manager, len(adapters), k, tokens_per_request, reps, rng)
                    r["tokens"] = k * tokens_per_request
                    modes[mode][str(k)] = r
            bd = breakdown(manager, len(adapters), max(ks), max(20, args.reps // 5), rng)
        finally:
            gc.enable()
        results = dict(setup=setup, modes=modes, breakdown=bd)
        results["stock_emulation"] = stock_set_lora(shape, adapters, args, rng)
        all_results[shape_name] = results
        print_table(shape_name, results, ks, results["stock_emulation"])
        del manager
        gc.collect()

    stamp = datetime.now(UTC)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"adapter_switch-{stamp:%Y%m%d}-{machine_tag(info)}"
    record = dict(
        benchmark="adapter_switch",
        what="µs of PagedAdapterManager.set_token_mapping per engine step (the whole per-step switch cost of "
             "resident adapters), per adapter = step / k",
        command=" ".join([".venv/bin/python benchmarks/bench_adapter_switch.py", *sys.argv[1:]]).strip(),
        date=stamp.isoformat(timespec="seconds"),
        machine=info,
        config=dict(
            shapes={n: dict(hf_config=SHAPES[n]["config"], dtype=str(SHAPES[n]["dtype"]),
                            page_elems=SHAPES[n]["page_elems"]) for n in args.shapes.split(",")},
            num_adapters=args.num_adapters, ranks=list(args.ranks), ks=ks,
            max_adapters_per_step=args.max_adapters_per_step, max_lora_rank=max(args.ranks),
            modes={"decode": 1, "prefill16": args.prefill_tokens},
            reps=dict(k_up_to_32=args.reps, above="max(60, reps * 32 // k)", warmup="max(3, reps // 20)",
                      breakdown_steps=max(20, args.reps // 5), stock=args.stock_reps),
            kernel_backend="torch", device="cpu", torch_threads=1, gc_disabled_while_timing=True, seed=args.seed,
            conditions={
                "switch": "fresh random k-set from all adapters each step (some may still be in a slot)",
                "switch_all_new": "random k-set of adapters in no slot (all k tables written)",
                "steady": "the same k-set as the previous step (no table write)",
                "none": "T tokens, all lora_int_id 0",
            },
        ),
        reference=dict(lamini_us_per_adapter_per_step=LAMINI_US_PER_ADAPTER_STEP,
                       note="from the issue; Lamini's own hardware and stack, not measured here"),
        results=all_results,
        total_seconds=round(time.perf_counter() - began, 1),
        load_average_1_5_15=dict(before=[round(x, 2) for x in load_before],
                                 after=[round(x, 2) for x in os.getloadavg()]),
    )
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    plot(stem.with_suffix(".png"), all_results, ks)
    print(f"\nwrote {stem.with_suffix('.json')} and .png ({record['total_seconds']} s)")


if __name__ == "__main__":
    main()
