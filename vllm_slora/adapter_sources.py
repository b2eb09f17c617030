"""Adapters found by name in directories (`slora` key `adapter_dirs`), loaded on first use.

What vLLM's `lora_filesystem_resolver` plugin does, without its two switches: it needs
`VLLM_PLUGINS` naming it (which, when set, switches off every plugin it does not name,
vllm-slora included, silently) and `VLLM_ALLOW_RUNTIME_LORA_UPDATING` (which also opens
the load / unload endpoints). Here the `slora` key is the only switch.

A request whose `model` is neither a served base model nor a loaded adapter is looked up
as `<dir>/<model>` in each directory in order (the first holding an
`adapter_config.json` wins). The adapter is then loaded exactly like
`/v1/load_lora_adapter` would: validated off the event loop (400 / 404 naming the
problem), given the next adapter id, added to the engine and listed in `/v1/models`.
Names found nowhere fall through to vLLM (404 "The model ... does not exist", or vLLM's
own resolvers when those are switched on).

Names are relative paths inside the directories: an absolute name, an empty, `.` or `..`
component, a NUL byte, or an adapter directory or file that is a symbolic link leading
outside the directory it was found in are refused with 400. Unlike vLLM's resolver,
`base_model_name_or_path` need not equal the served model's name: the validator checks
the adapter's shapes against the base model, which is what matters.

Driven by patches/patch_engine_serving.py (BaseServing._check_model, OpenAI server only).
"""

from __future__ import annotations

import asyncio
import os
import weakref
from http import HTTPStatus

from vllm_slora.config import SLoRAConfig

_ATTR = "_vllm_slora_adapter_sources"
_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_MISSING = object()


class AdapterSourceError(ValueError):
    """A request names an adapter in a way that could leave the adapter directories."""


class AdapterDirectories:
    def __init__(self, directories: tuple[str, ...]) -> None:
        self.directories = tuple(directories)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def locate(self, name: str) -> str | None:
        """Real path of adapter `name` in the first directory that has it, None if none has.

        Raises AdapterSourceError for a name or a link that leads outside the directories.
        """
        if "\x00" in name:
            raise AdapterSourceError(f"adapter name {name!r} contains a NUL byte")
        if os.path.isabs(name) or any(part in ("", ".", "..") for part in name.split(os.sep)):
            raise AdapterSourceError(
                f"adapter name {name!r} must be a relative path inside adapter_dirs "
                "(no leading '/', no empty, '.' or '..' components)"
            )
        for directory in self.directories:
            root = os.path.realpath(directory)
            candidate = os.path.join(root, name)
            if not os.path.isfile(os.path.join(candidate, "adapter_config.json")):
                continue
            real = os.path.realpath(candidate)
            escaped = not _inside(real, root) or any(
                os.path.lexists(file) and not _inside(os.path.realpath(file), root)
                for file in (os.path.join(real, f) for f in _FILES)
            )
            if escaped:
                raise AdapterSourceError(
                    f"adapter {name!r} in adapter_dirs is a symbolic link (or has files that are) "
                    "leading outside its directory; refused"
                )
            return real
        return None

    async def load(self, models, name: str):
        """Load adapter `name` from the directories into the server `models`.

        Returns None when no directory has it (or it is loaded already), else the
        ErrorResponse to answer (400 / 404 naming the adapter and the problem).
        """
        lock = self._locks.get(name)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[name] = lock
        async with lock:  # concurrent first requests of one name load it once
            if name in models.lora_requests:
                return None
            try:
                path = await asyncio.to_thread(self.locate, name)
            except AdapterSourceError as exc:
                from vllm_slora.compat import create_error_response

                return create_error_response(str(exc), param="model")
            if path is None:
                return None
            from vllm_slora.compat import LoadLoRAAdapterRequest, logger

            result = await models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=path))
            if isinstance(result, str) or name in models.lora_requests:  # loaded (here or by a racing load)
                logger.info("vllm-slora: loaded adapter %r from adapter_dirs (%s)", name, path)
                return None
            error = getattr(result, "error", None)
            if error is not None and error.code == HTTPStatus.INTERNAL_SERVER_ERROR:
                logger.error("vllm-slora: adapter %r from adapter_dirs failed to load: %s", name, error.message)
            return result


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def sources_for(models) -> AdapterDirectories | None:
    """The adapter directories of an OpenAI server's models, None when it has none."""
    cached = models.__dict__.get(_ATTR, _MISSING)
    if cached is _MISSING:
        engine_client = getattr(models, "engine_client", None)
        vllm_config = getattr(engine_client, "vllm_config", None)
        slora = SLoRAConfig.from_additional_config(getattr(vllm_config, "additional_config", None))
        cached = AdapterDirectories(slora.adapter_dirs) if slora is not None and slora.adapter_dirs else None
        setattr(models, _ATTR, cached)
    return cached
