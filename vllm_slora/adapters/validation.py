"""Turn an adapter directory into a validated `AdapterSpec`, cheaply.

Everything that can be wrong with an adapter is found here, at registration, from
`adapter_config.json` and the weight file's header alone: unsupported PEFT features,
targets other than the seven Llama projections, ranks above the limit, tensors that
do not match the base model, stray or unpaired tensors, corrupt files, and adapters
that could never fit the pool. Tensor data is read later (`loading.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import threading
from collections import OrderedDict

from .base_model import BaseModelShape
from .checkpoint import FLOAT_DTYPES, PICKLE_NAMES, SAFETENSORS_NAME, CheckpointIndex, TensorInfo, index_checkpoint
from .errors import AdapterError, AdapterNotFoundError
from .modules import PARENT_MODULE, SLICE_ORDER, module_name, unsupported_module_names
from .peft_config import MAX_ABS_SCALING, LoraHyperparams, parse_lora_config
from .spec import AdapterSpec, SliceSpec

CONFIG_NAME = "adapter_config.json"
# Real configs are a few KiB (a rank_pattern naming every module of a 70B model: ~60 KiB).
MAX_CONFIG_BYTES = 1 << 20

# PEFT's saved key: base_model.model.<module name>.lora_A.weight (adapter name stripped).
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>(?:model\.)?layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<proj>\w+))"
    r"\.(?P<kind>lora_A|lora_B)\.weight$"
)


def read_adapter_config(adapter_name: str, adapter_dir: str) -> dict:
    """The parsed `adapter_config.json`.

    Raises AdapterNotFoundError (the same message whether the directory is missing or
    only its config, so nothing is revealed about other paths) or AdapterError.
    """
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isdir(adapter_dir) or not os.path.isfile(path):
        raise AdapterNotFoundError(adapter_name, adapter_dir)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise AdapterError(adapter_name, f"{CONFIG_NAME} could not be read ({exc.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(adapter_name, f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise AdapterError(adapter_name, f"{CONFIG_NAME} is not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise AdapterError(adapter_name, f"{CONFIG_NAME} is not valid JSON ({exc.msg} at line {exc.lineno} "
                                         f"column {exc.colno})") from None
    except RecursionError:
        raise AdapterError(adapter_name, f"{CONFIG_NAME} is not valid JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise AdapterError(adapter_name, f"{CONFIG_NAME} must hold a JSON object")
    return config


def _check_targets(name: str, params: LoraHyperparams, base: BaseModelShape) -> None:
    """Refuse targets that are not among the seven projections (embeddings, lm_head, ...)."""
    supported = [module_name(i, p) for i in range(base.num_layers) for p in SLICE_ORDER]
    unsupported = unsupported_module_names(base.num_layers)
    allowed = ", ".join(SLICE_ORDER)
    if isinstance(params.target_modules, str):
        bad = [m for m in unsupported if params.targets(m)]
        if bad:
            raise AdapterError(name, f"unsupported target module {bad[0]!r} (target_modules regex "
                                     f"{params.target_modules!r}); only {allowed} are supported"
                                     + _vocab_note(bad[0]))
        if not any(params.targets(m) for m in supported):
            raise AdapterError(name, f"target_modules regex {params.target_modules!r} matches none of {allowed}")
        return
    for entry in params.target_modules:
        hits_unsupported = any(params.entry_matches(entry, m) for m in unsupported)
        if hits_unsupported or not any(params.entry_matches(entry, m) for m in supported):
            raise AdapterError(name, f"unsupported target module {entry!r}; only {allowed} are supported"
                                     + _vocab_note(entry))


def _vocab_note(module: str) -> str:
    """Why embedding / output-layer LoRA is refused, for messages naming such a module."""
    if "embed_tokens" in module or "lm_head" in module or "embedding" in module:
        return ("; LoRA on embed_tokens / lm_head (the vocabulary layers) is not served: vllm-slora "
                "applies adapters to the decoder layers' projections only")
    return ""


def _classify_stray_key(name: str, key: str) -> AdapterError:
    if "lora_magnitude_vector" in key:
        return AdapterError(name, f"DoRA weights ({key}) are not supported")
    if key.endswith(".bias"):
        return AdapterError(name, f"LoRA bias tensor {key} is not supported")
    if "embed_tokens" in key or "lm_head" in key or "lora_embedding" in key:
        return AdapterError(name, f"tensor {key} targets an unsupported module{_vocab_note(key)}")
    return AdapterError(name, f"tensor {key} does not belong to any target module")


def _group_lora_tensors(
    name: str, params: LoraHyperparams, base: BaseModelShape, tensors: dict[str, TensorInfo]
) -> dict[tuple[int, str], dict[str, tuple[str, TensorInfo]]]:
    """{(layer, projection): {"lora_A"/"lora_B": (key, info)}}; refuses stray keys."""
    grouped: dict[tuple[int, str], dict[str, tuple[str, TensorInfo]]] = {}
    for key, info in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise _classify_stray_key(name, key)
        layer, proj, parent = int(match["layer"]), match["proj"], match["parent"]
        if PARENT_MODULE.get(proj) != parent:
            raise AdapterError(name, f"tensor {key} targets unsupported module {parent}.{proj}; "
                                     f"only {', '.join(SLICE_ORDER)} are supported")
        if layer >= base.num_layers:
            raise AdapterError(name, f"tensor {key} is for layer {layer}, the base model has {base.num_layers}")
        if not params.targets(module_name(layer, proj)):
            raise AdapterError(name, f"tensor {key} does not belong to any target module of adapter_config.json")
        grouped.setdefault((layer, proj), {})[match["kind"]] = (key, info)
    return grouped


def _slice_spec(
    name: str, params: LoraHyperparams, base: BaseModelShape, layer: int, proj: str,
    found: dict[str, tuple[str, TensorInfo]] | None,
) -> SliceSpec:
    module = module_name(layer, proj)
    if not params.targets(module):
        return SliceSpec(proj, 0, 0.0)
    if not found:
        raise AdapterError(name, f"{module} is a target module but the checkpoint has no lora_A/lora_B for it")
    for kind in ("lora_A", "lora_B"):
        if kind not in found:
            present = "lora_B" if kind == "lora_A" else "lora_A"
            raise AdapterError(name, f"{module} has {present} but its {kind} is missing")
    rank = params.rank_for(module)
    in_features, out_features = base.features(proj)
    expected = {"lora_A": (rank, in_features), "lora_B": (out_features, rank)}
    for kind, (key, info) in found.items():
        if info.dtype not in FLOAT_DTYPES:
            raise AdapterError(name, f"tensor {key} has dtype {info.dtype}, expected a float type")
        if info.shape != expected[kind]:
            raise AdapterError(name, f"tensor {key} has shape {list(info.shape)}, expected "
                                     f"{list(expected[kind])} (rank {rank} for the base model's {proj})")
    scaling = params.scaling_for(module)
    if not math.isfinite(scaling) or abs(scaling) > MAX_ABS_SCALING:
        raise AdapterError(name, f"scaling {scaling:g} of {module} (lora_alpha {params.alpha_for(module)!r}, rank "
                                 f"{rank}{', rslora' if params.use_rslora else ''}) is outside "
                                 f"[-{MAX_ABS_SCALING:g}, {MAX_ABS_SCALING:g}]")
    return SliceSpec(proj, rank, scaling, found["lora_A"][0], found["lora_B"][0])


def inspect_adapter(
    name: str,
    path: str | os.PathLike,
    base: BaseModelShape,
    *,
    max_lora_rank: int | None = None,
    page_elems: int | None = None,
    pool_blocks: int | None = None,
    tp_size: int = 1,
    allow_pickle: bool = False,
) -> AdapterSpec:
    """Validate an adapter directory against a base model and describe it.

    Reads only `adapter_config.json` and the weight file's header (pickle checkpoints,
    when allowed, are memory-mapped). ``page_elems`` (per TP rank) and ``pool_blocks``
    enable the "fits the pool" check. Raises AdapterError naming the adapter and the
    problem, and nothing else: an unforeseen failure is reported as one too.
    """
    path = os.fspath(path)
    files = adapter_files_identity(path)
    key = (name, path, files, base, max_lora_rank, page_elems, pool_blocks, tp_size, allow_pickle)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
    if cached is None:
        try:
            cached = _inspect_adapter(name, path, base, max_lora_rank=max_lora_rank, page_elems=page_elems,
                                      pool_blocks=pool_blocks, tp_size=tp_size, allow_pickle=allow_pickle)
            cached = dataclasses.replace(cached, files=files)
        except AdapterError as exc:
            cached = exc
        with _cache_lock:
            _cache[key] = cached
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    if isinstance(cached, AdapterError):
        cls, args = cached.__reduce__()
        raise cls(*args)  # a fresh exception per caller: threads share the cache
    return cached


# Validation runs once per adapter version and process: results (specs and errors)
# are kept per name, path, limits and the files' (inode, size, mtime).
_CACHE_SIZE = 128  # specs of ~200 KB each (a header index + per-slice specs)
_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


def adapter_files_identity(path: str) -> tuple:
    """(inode, size, mtime_ns) of each file an adapter may have (None where absent)."""
    identity = []
    for file in (CONFIG_NAME, SAFETENSORS_NAME, *PICKLE_NAMES):
        try:
            st = os.stat(os.path.join(path, file))
            identity.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except (OSError, ValueError):
            identity.append(None)
    return tuple(identity)


def _inspect_adapter(
    name: str, path: str, base: BaseModelShape, *, max_lora_rank: int | None,
    page_elems: int | None, pool_blocks: int | None, tp_size: int, allow_pickle: bool,
) -> AdapterSpec:
    try:
        return _inspect_uncached(name, path, base, max_lora_rank=max_lora_rank, page_elems=page_elems,
                                 pool_blocks=pool_blocks, tp_size=tp_size, allow_pickle=allow_pickle)
    except AdapterError:
        raise
    except OSError as exc:  # strerror only: the filename may be a path the caller did not give
        raise AdapterError(name, f"adapter files could not be read ({exc.strerror or type(exc).__name__})") from None
    except Exception as exc:
        raise AdapterError(name, f"adapter could not be validated ({type(exc).__name__}: {exc})") from None


def _inspect_uncached(
    name: str, path: str, base: BaseModelShape, *, max_lora_rank: int | None,
    page_elems: int | None, pool_blocks: int | None, tp_size: int, allow_pickle: bool,
) -> AdapterSpec:
    params = parse_lora_config(name, read_adapter_config(name, path))
    _check_targets(name, params, base)
    checkpoint: CheckpointIndex = index_checkpoint(name, path, allow_pickle=allow_pickle)
    if not checkpoint.tensors:
        raise AdapterError(name, f"{os.path.basename(checkpoint.path)} holds no tensors")
    grouped = _group_lora_tensors(name, params, base, dict(checkpoint.tensors))

    # Rank limit first: a too-large rank also makes every tensor shape "wrong".
    ranks = [params.rank_for(module_name(i, p)) for i in range(base.num_layers) for p in SLICE_ORDER
             if params.targets(module_name(i, p))]
    if max_lora_rank is not None and ranks and max(ranks) > max_lora_rank:
        raise AdapterError(name, f"LoRA rank {max(ranks)} is greater than max_lora_rank {max_lora_rank}")

    layers = tuple(
        tuple(_slice_spec(name, params, base, i, p, grouped.get((i, p))) for p in SLICE_ORDER)
        for i in range(base.num_layers)
    )
    if not any(s.rank for layer in layers for s in layer):
        raise AdapterError(name, "adapter_config.json targets no module of this base model")
    spec = AdapterSpec(name=name, path=path, base=base, hyperparams=params, checkpoint=checkpoint, layers=layers)

    if page_elems is not None:
        try:
            blocks = spec.blocks_needed(page_elems, tp_size)
        except ValueError as exc:  # a row longer than a page
            raise AdapterError(name, str(exc)) from None
        if pool_blocks is not None and blocks > pool_blocks:
            raise AdapterError(name, f"needs {blocks} pool blocks but the whole pool has {pool_blocks}")
    return spec
