"""The adapter's weight file: found, checked cheaply, and read when needed.

Registration only looks at the safetensors *header* (the first 8 + N bytes) and the
file length, so a corrupt or truncated file is refused before any tensor is read and
thousands of adapters register in milliseconds each. Pickle checkpoints
(`adapter_model.bin`/`.pt`) can execute code when unpickled; they are refused unless
the operator allows them, and then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .errors import AdapterError

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt")

# Element sizes of the safetensors dtype codes.
_SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_TORCH_TO_CODE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

# A LoRA header lists a few hundred tensors; anything this large is not a header.
_MAX_HEADER_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Shape and safetensors dtype code of one stored tensor."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class CheckpointIndex:
    """Where an adapter's weights are and what tensors the file holds (no data)."""

    path: str
    format: str  # "safetensors" or "pickle"
    tensors: Mapping[str, TensorInfo]


def read_safetensors_header(adapter_name: str, path: str) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without reading tensor data.

    Checks that the header is valid JSON describing tensors whose byte ranges are
    consistent with their shapes and dtypes and exactly cover the data that follows
    (a shorter file is truncated, a longer one is not a safetensors file). Messages
    never state the file's size or quote its bytes: the file may be a symlink to
    something else on the server.
    """

    def bad(problem: str) -> AdapterError:
        return AdapterError(adapter_name, f"{os.path.basename(path)} is corrupt or truncated: {problem}")

    try:
        file_size = os.path.getsize(path)
        if file_size < 8:
            raise bad("the file is shorter than the 8-byte header length")
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise bad("the header length does not fit the file")
            raw = f.read(header_len)
    except OSError as exc:
        raise AdapterError(adapter_name, f"{os.path.basename(path)} could not be read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")

    data_len = file_size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not all(type(v) is int for v in (*shape, start, stop)):
                raise TypeError
            shape = tuple(shape)
            itemsize = _SAFETENSORS_ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError):
            raise bad(f"malformed header entry for tensor {key[:200]!r}") from None
        if any(d < 0 for d in shape) or not 0 <= start <= stop:
            raise bad(f"tensor {key[:200]!r} has a negative size or offset")
        if stop - start != math.prod(shape) * itemsize:
            raise bad(f"tensor {key[:200]!r} spans {stop - start} bytes, its shape {list(shape)} {dtype} needs "
                      f"{math.prod(shape) * itemsize}")
        data_end = max(data_end, stop)
        tensors[key] = TensorInfo(shape, dtype)
    if data_end > data_len:
        raise bad(f"tensor data needs {data_end} bytes after the header, the file has fewer")
    if data_end < data_len:
        raise bad("unexpected bytes after the last tensor")
    return tensors


def _load_pickle(adapter_name: str, path: str) -> dict[str, torch.Tensor]:
    try:
        try:
            # mmap keeps registration cheap for zip-format checkpoints.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as exc:  # any unpickling failure means the file cannot be served
        # Only the exception type: unpickling messages quote the file's bytes.
        raise AdapterError(adapter_name, f"{os.path.basename(path)} could not be read as a PyTorch checkpoint "
                                         f"({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(adapter_name, f"{os.path.basename(path)} does not hold a dict of tensors")
    return state


def index_checkpoint(adapter_name: str, adapter_dir: str, allow_pickle: bool = False) -> CheckpointIndex:
    """Find the adapter's weight file and list its tensors, cheaply.

    Prefers `adapter_model.safetensors`; falls back to a pickle checkpoint only when
    ``allow_pickle`` is true.
    """
    st_path = os.path.join(adapter_dir, SAFETENSORS_NAME)
    if os.path.isfile(st_path):
        tensors = read_safetensors_header(adapter_name, st_path)
        # The header passed our checks; let the safetensors library confirm (mmap, no reads).
        try:
            from safetensors import safe_open

            with safe_open(st_path, framework="pt") as f:
                f.keys()
        except Exception as exc:  # SafetensorError and OS errors alike
            raise AdapterError(adapter_name, f"{SAFETENSORS_NAME} is corrupt ({type(exc).__name__})") from None
        return CheckpointIndex(st_path, "safetensors", tensors)

    pickles = [os.path.join(adapter_dir, n) for n in PICKLE_NAMES if os.path.isfile(os.path.join(adapter_dir, n))]
    if not pickles:
        raise AdapterError(adapter_name, f"no {SAFETENSORS_NAME} (or {' / '.join(PICKLE_NAMES)}) in the adapter "
                                         "directory")
    if not allow_pickle:
        raise AdapterError(
            adapter_name,
            f"only a pickle checkpoint ({os.path.basename(pickles[0])}) is present; pickle files can run "
            "code when loaded, so they are refused unless allowed (slora config allow_pickle_adapters=true). "
            "Convert it to adapter_model.safetensors instead",
        )
    state = _load_pickle(adapter_name, pickles[0])
    tensors = {}
    for key, value in state.items():
        code = _TORCH_TO_CODE.get(value.dtype, str(value.dtype))
        tensors[key] = TensorInfo(tuple(value.shape), code)
    return CheckpointIndex(pickles[0], "pickle", tensors)


def read_tensors(adapter_name: str, index: CheckpointIndex, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read the named tensors (CPU, stored dtype) from the checkpoint."""
    keys = list(keys)
    try:
        if index.format == "safetensors":
            from safetensors import safe_open

            with safe_open(index.path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}
        state = _load_pickle(adapter_name, index.path)
        return {k: state[k] for k in keys}
    except AdapterError:
        raise
    except Exception as exc:  # the file changed or broke since registration
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise AdapterError(adapter_name, f"reading weights from {os.path.basename(index.path)} failed ({detail}); "
                                         "was the file changed after the adapter was loaded?") from None
