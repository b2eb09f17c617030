"""Uploaded files of the OpenAI Files API (`/v1/files`): a directory with one JSON record per file.

Layout under the store's root: ``<id>.data`` (the bytes as uploaded) and ``<id>.json``
(id, bytes, created_at, filename, purpose, status). Ids are ``file-<24 hex>``. Both are
written under temporary names and renamed, so a crash never leaves half a record; the
records found at start-up are served again (a persistent root keeps uploads across
restarts, see `finetune_root`).

Checks at upload:
* the size limit (`max_bytes`, 512 MiB unless ``VLLM_SLORA_MAX_UPLOAD_MB`` says
  otherwise) is enforced while the bytes are copied: 413 naming the limit;
* a purpose with a registered check (the server registers one for ``fine-tune``: the
  JSONL parse and per-line shape checks of `data.py` with the served model's tokenizer,
  so not JSONL / wrong shape / mixed formats / empty -> 400 naming the line and the
  problem) runs before the file is accepted; nothing is kept when it fails.

`ApiError` (an HTTP status plus OpenAI's error fields) is shared by this module, jobs.py
and api.py, which turns it into ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

# Where uploads and job directories live: `<dir>/files`, `<dir>/jobs`. Unset: a new
# temporary directory per server (nothing survives a restart).
ENV_FINETUNE_DIR = "VLLM_SLORA_FINETUNE_DIR"
ENV_MAX_UPLOAD_MB = "VLLM_SLORA_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 512

FINE_TUNE = "fine-tune"
FINE_TUNE_RESULTS = "fine-tune-results"
# Purposes a client may upload with (OpenAI's list minus the ones the server writes).
UPLOAD_PURPOSES = (FINE_TUNE, "batch", "assistants", "vision", "user_data")
_CHUNK = 1 << 20
_MAX_FILENAME = 255


class ApiError(Exception):
    """An error answered to the client: HTTP status + OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        if self.status == 404:
            return "not_found_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def finetune_root() -> Path:
    """``$VLLM_SLORA_FINETUNE_DIR`` (created when missing), else a fresh temporary directory."""
    configured = os.environ.get(ENV_FINETUNE_DIR)
    if configured:
        root = Path(configured).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        return root
    return Path(tempfile.mkdtemp(prefix="vllm-slora-finetune-"))


def max_upload_bytes() -> int:
    raw = os.environ.get(ENV_MAX_UPLOAD_MB, str(DEFAULT_MAX_UPLOAD_MB))
    try:
        mib = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_MAX_UPLOAD_MB} must be a number of MiB, got {raw!r}") from None
    if mib <= 0:
        raise ValueError(f"{ENV_MAX_UPLOAD_MB} must be positive, got {raw!r}")
    return int(mib * (1 << 20))


@dataclass
class StoredFile:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"

    def to_openai(self) -> dict:
        return {**asdict(self), "object": "file", "expires_at": None, "status_details": None}


# A purpose's check: (path of the uploaded bytes, the client's filename) -> None, or raises ApiError.
FileCheck = Callable[[Path, str], None]


class FileStore:
    """Thread-safe; the API calls its blocking methods from worker threads."""

    def __init__(self, root: str | os.PathLike, max_bytes: int, checks: Mapping[str, FileCheck] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.checks = dict(checks or {})
        self._lock = threading.Lock()
        self._files: dict[str, StoredFile] = {}
        for record in sorted(self.root.glob("file-*.json")):
            try:
                stored = StoredFile(**json.loads(record.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # a foreign or damaged record is not served
            if (self.root / f"{stored.id}.data").exists():
                self._files[stored.id] = stored

    # -- writing ---------------------------------------------------------------------------
    def create(self, filename: str | None, purpose: str | None, source: BinaryIO) -> StoredFile:
        """Copy an upload into the store (size limit, purpose check), then record it."""
        if not isinstance(purpose, str) or purpose not in UPLOAD_PURPOSES:
            raise ApiError(400, f"'purpose' must be one of {', '.join(UPLOAD_PURPOSES)}, got {purpose!r}",
                           param="purpose", code="invalid_purpose")
        name = _clean_filename(filename)
        file_id = _new_id("file")
        tmp = self.root / f".{file_id}.upload"
        try:
            size = 0
            with open(tmp, "wb") as out:
                while chunk := source.read(_CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ApiError(
                            413, f"file {name!r} is larger than the upload limit of {self.max_bytes} bytes "
                            f"({self.max_bytes / (1 << 20):g} MiB; the server's {ENV_MAX_UPLOAD_MB} sets it)",
                            param="file", code="file_too_large",
                        )
                    out.write(chunk)
            check = self.checks.get(purpose)
            if check is not None:
                check(tmp, name)
            return self._commit(tmp, StoredFile(file_id, size, int(time.time()), name, purpose))
        finally:
            tmp.unlink(missing_ok=True)

    def add_bytes(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        """A file the server writes itself (e.g. a job's fine-tune-results CSV); no checks."""
        file_id = _new_id("file")
        tmp = self.root / f".{file_id}.upload"
        try:
            tmp.write_bytes(data)
            return self._commit(tmp, StoredFile(file_id, len(data), int(time.time()), _clean_filename(filename), purpose))
        finally:
            tmp.unlink(missing_ok=True)

    def _commit(self, tmp: Path, stored: StoredFile) -> StoredFile:
        os.replace(tmp, self.root / f"{stored.id}.data")
        record_tmp = self.root / f".{stored.id}.json.tmp"
        record_tmp.write_text(json.dumps(asdict(stored)))
        os.replace(record_tmp, self.root / f"{stored.id}.json")
        with self._lock:
            self._files[stored.id] = stored
        return stored

    def delete(self, file_id: str) -> None:
        with self._lock:
            stored = self._files.pop(file_id, None)
        if stored is None:
            raise _not_found(file_id)
        (self.root / f"{file_id}.json").unlink(missing_ok=True)
        (self.root / f"{file_id}.data").unlink(missing_ok=True)

    # -- reading ---------------------------------------------------------------------------
    def get(self, file_id: str) -> StoredFile:
        with self._lock:
            stored = self._files.get(file_id)
        if stored is None:
            raise _not_found(file_id)
        return stored

    def content_path(self, file_id: str) -> Path:
        self.get(file_id)
        return self.root / f"{file_id}.data"

    def list(
        self, purpose: str | None = None, after: str | None = None, limit: int = 10000, order: str = "desc"
    ) -> tuple[list[StoredFile], bool]:
        """(files, has_more): by created_at (`order` "desc": newest first), after the file `after`."""
        if order not in ("asc", "desc"):
            raise ApiError(400, f"'order' must be 'asc' or 'desc', got {order!r}", param="order")
        with self._lock:
            files = [f for f in self._files.values() if purpose is None or f.purpose == purpose]
        # Ids break ties of the one-second created_at; insertion order is not kept on disk.
        files.sort(key=lambda f: (f.created_at, f.id), reverse=order == "desc")
        return page_after(files, after, limit, lambda f: f.id, "after")


def page_after(items: list, after: str | None, limit: int, key: Callable, param: str) -> tuple[list, bool]:
    """The cursor pagination of OpenAI's list endpoints: up to `limit` items following the one with id `after`."""
    if not isinstance(limit, int) or limit < 1:
        raise ApiError(400, f"'limit' must be a positive integer, got {limit!r}", param="limit")
    start = 0
    if after is not None:
        ids = [key(item) for item in items]
        if after not in ids:
            raise ApiError(400, f"'{param}' cursor {after!r} is not in this list", param=param)
        start = ids.index(after) + 1
    chosen = items[start:start + limit]
    return chosen, start + limit < len(items)


def _not_found(file_id: str) -> ApiError:
    return ApiError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _clean_filename(filename: str | None) -> str:
    """The client's file name without any directory part (it is only ever displayed)."""
    name = os.path.basename((filename or "").replace("\\", "/")).strip()
    return (name or "upload")[:_MAX_FILENAME]
