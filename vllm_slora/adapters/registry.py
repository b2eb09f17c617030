"""Adapters known to an engine, by name, each validated once at registration."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

from .base_model import BaseModelShape
from .spec import AdapterSpec
from .validation import inspect_adapter


class AdapterRegistry:
    """Name -> `AdapterSpec`, with the engine-wide limits every adapter is checked against.

    Registering a name again replaces its spec with a new, larger `version`, so anything
    keyed on (name, version) (prefix-cache hashes, host caches) never reuses stale weights.
    """

    def __init__(
        self,
        base: BaseModelShape,
        *,
        max_lora_rank: int | None = None,
        page_elems: int | None = None,
        pool_blocks: int | None = None,
        tp_size: int = 1,
        allow_pickle: bool = False,
    ) -> None:
        self.base = base
        self.max_lora_rank = max_lora_rank
        self.page_elems = page_elems
        self.pool_blocks = pool_blocks
        self.tp_size = tp_size
        self.allow_pickle = allow_pickle
        self._specs: dict[str, AdapterSpec] = {}
        # One counter for all names: a name registered again (even after unregister)
        # never repeats a version, and unregistered names leave nothing behind.
        self._last_version = 0

    def register(self, name: str, path: str | os.PathLike) -> AdapterSpec:
        """Validate the adapter at ``path`` and make it known as ``name``.

        Raises AdapterError (the registry is unchanged then).
        """
        spec = inspect_adapter(
            name, path, self.base,
            max_lora_rank=self.max_lora_rank, page_elems=self.page_elems, pool_blocks=self.pool_blocks,
            tp_size=self.tp_size, allow_pickle=self.allow_pickle,
        )
        self._last_version += 1
        spec = dataclasses.replace(spec, version=self._last_version)
        self._specs[name] = spec
        return spec

    def unregister(self, name: str) -> AdapterSpec | None:
        """Forget ``name``; returns its spec, or None if it was not registered."""
        return self._specs.pop(name, None)

    def get(self, name: str) -> AdapterSpec | None:
        return self._specs.get(name)

    def __getitem__(self, name: str) -> AdapterSpec:
        return self._specs[name]

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)
