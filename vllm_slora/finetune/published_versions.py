"""Engine-side switch to a co-served job's newest published version (scheduler side).

A job's adapter is served under one name (``fine_tuned_model``); the API server's
LoRARequest for that name points at the version it last loaded (``<job dir>/step-K``).
Reloading it there takes engine calls that wait for gaps between training steps (about
half a second on a loaded CPU engine). Instead, the scheduler learns of every publish from
the worker's report at the end of the very step that published it, and from then on every
request for the name that has not started yet gets the newest version:

* its LoRARequest is replaced by one for ``<job dir>/step-N`` with an id of its own
  (a version is an adapter: old and new can be resident side by side, so running
  requests keep the version they started with and the next request does not wait for
  them to finish);
* its prefix-cache block hashes are computed again for that version (new path, new
  files), so it never reuses KV computed with older weights.

Only requests whose adapter is one of the job's own versions are followed (same name, a
``step-*`` directory in the job's directory): an adapter loaded by hand under the same
name is served as asked. A request that has produced output keeps its version.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

# Ids of engine-published versions: far above the API server's (which count up from 1),
# within int32 (vLLM keeps request->lora id maps in int64 arrays; int32 leaves margin).
FIRST_VERSION_ID = 1 << 30


@dataclass
class PublishedVersion:
    job_id: str
    name: str  # the served model name (fine_tuned_model)
    job_dir: Path
    step: int
    lora_request: object  # vllm LoRARequest of this version
    updated_at: float  # wall time the optimizer update that made it ended (worker clock)
    servable_at: float  # wall time the scheduler started giving it to new requests
    updated_step: int | None = None  # the engine step the update ended in
    first_request_at: float | None = None
    first_request_step: int | None = None
    # Steps between the first one that could have admitted that request with this version (the
    # one after updated_step, or the request's own first) and the one that did (0: none lost).
    first_request_steps_late: int | None = None


class PublishedVersions:
    """The newest published version of every job's adapter name in this engine."""

    def __init__(self, clock=time.time) -> None:
        self._latest: dict[str, PublishedVersion] = {}
        self._by_id: dict[int, PublishedVersion] = {}  # the same versions by lora_int_id
        self._ids = itertools.count(FIRST_VERSION_ID)
        self._clock = clock

    def __bool__(self) -> bool:
        return bool(self._latest)

    def publish(self, job_id: str, name: str, job_dir: str, step: int, path: str,
                updated_at: float | None, updated_step: int | None = None) -> PublishedVersion:
        from vllm.lora.request import LoRARequest

        now = self._clock()
        version = PublishedVersion(
            job_id=job_id, name=name, job_dir=Path(job_dir), step=step,
            lora_request=LoRARequest(name, next(self._ids), str(path)),
            updated_at=updated_at if updated_at is not None else now, servable_at=now, updated_step=updated_step,
        )
        replaced = self._latest.get(name)
        if replaced is not None:
            del self._by_id[replaced.lora_request.lora_int_id]
        self._latest[name] = version
        self._by_id[version.lora_request.lora_int_id] = version
        return version

    def newest(self, name: str) -> PublishedVersion | None:
        return self._latest.get(name)

    def newest_for(self, lora_request) -> PublishedVersion | None:
        """The version a not-yet-started request for ``lora_request`` should get instead
        (None: serve it as it is)."""
        if lora_request is None:
            return None
        version = self._latest.get(lora_request.lora_name)
        if version is None or lora_request.lora_int_id == version.lora_request.lora_int_id:
            return None
        path = Path(lora_request.lora_path)
        if path.parent != version.job_dir or not path.name.startswith("step-"):
            return None  # not one of the job's versions: loaded by hand under the same name
        return version

    def first_request(self, lora_int_id: int, engine_step: int | None = None) -> PublishedVersion | None:
        """Note that a request of ``lora_int_id`` was admitted (in ``engine_step``); returns its
        version the first time."""
        version = self._by_id.get(lora_int_id)
        if version is None or version.first_request_at is not None:
            return None
        version.first_request_at = self._clock()
        version.first_request_step = engine_step
        return version

    def describe(self) -> list[dict]:
        """Every name's newest version, with the times from its update to serving it."""
        return [{
            "name": v.name, "job_id": v.job_id, "step": v.step, "lora_int_id": v.lora_request.lora_int_id,
            "path": v.lora_request.lora_path, "updated_at": v.updated_at, "servable_at": v.servable_at,
            "first_request_at": v.first_request_at, "updated_step": v.updated_step,
            "first_request_step": v.first_request_step, "first_request_steps_late": v.first_request_steps_late,
        } for v in self._latest.values()]
