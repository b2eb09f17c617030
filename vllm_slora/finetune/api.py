"""The OpenAI Files and Fine-tuning endpoints on vLLM's API server, for engines with the `slora` key.

Routes (shapes as the `openai` Python client parses them; errors are 4xx with
``{"error": {"message", "type", "param", "code"}}``):

    POST   /v1/files                                   multipart: file, purpose
    GET    /v1/files                                   ?purpose &after &limit &order
    GET    /v1/files/{file_id}
    DELETE /v1/files/{file_id}
    GET    /v1/files/{file_id}/content
    POST   /v1/fine_tuning/jobs
    GET    /v1/fine_tuning/jobs                        ?after &limit (newest first)
    GET    /v1/fine_tuning/jobs/{job_id}
    POST   /v1/fine_tuning/jobs/{job_id}/cancel
    POST   /v1/fine_tuning/jobs/{job_id}/pause             status "paused": no training until resumed
    POST   /v1/fine_tuning/jobs/{job_id}/resume
    GET    /v1/fine_tuning/jobs/{job_id}/events        ?after &limit (newest first)
    GET    /v1/fine_tuning/jobs/{job_id}/checkpoints   ?after &limit (newest first)
    GET    /v1/fine_tuning/coserve                     extension: the engine's co-serving state
    POST   /v1/fine_tuning/coserve                     extension: {"slack": x} changes it while serving

`FinetuneEndpointPlugin` follows vLLM's endpoint-plugin contract
(vllm/plugins/endpoint_plugins/interface.py): `attach_router` adds the routes while
`build_app` runs (only when the server's `--additional-config` has the `slora` key),
`init_state` builds the file store and the job manager once the engine and
`OpenAIServingModels` exist. vLLM loads endpoint plugins only when `VLLM_PLUGINS` names
them (which would switch off vllm-slora itself unless named too), so
patches/patch_plugins.py hands this plugin to vLLM's loader instead; see PATCHES.

The routes sit under /v1, so `--api-key` guards them like vLLM's own. Not supported with
``--api-server-count`` > 1 (each API server process would hold its own files and jobs):
the routes then answer 400 saying so.
"""

from __future__ import annotations

import asyncio
import functools
import os
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from .files import FINE_TUNE, ApiError, FileStore, finetune_root, max_upload_bytes
from .jobs import EngineInfo, FineTuningJobs, PublishError, finetune_threads

PLUGIN_NAME = "slora_finetune"
_STATE = "slora_finetune"
_DISABLED = "slora_finetune_disabled"
_FORM_OVERHEAD = 1 << 20  # multipart headers and boundaries on top of the file's bytes

router = APIRouter()


def slora_enabled(additional_config: Any) -> bool:
    from vllm_slora.config import SLORA_KEY

    return isinstance(additional_config, dict) and SLORA_KEY in additional_config


class FinetuneEndpointPlugin:
    """A `vllm.endpoint_plugins` plugin (duck-typed to vLLM's EndpointPlugin protocol)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        args = getattr(app.state, "args", None)
        if slora_enabled(getattr(args, "additional_config", None)):
            app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None or not slora_enabled(engine_client.vllm_config.additional_config):
            return
        from vllm_slora.compat import logger

        servers = getattr(args, "api_server_count", None) or 1
        if servers > 1:
            setattr(state, _DISABLED, f"the Files and Fine-tuning API of vllm-slora needs a single API server "
                    f"process (this server runs --api-server-count {servers})")
            logger.warning("vllm-slora: %s", getattr(state, _DISABLED))
            return
        models = state.openai_serving_models
        root = finetune_root()
        files = FileStore(root / "files", max_upload_bytes())
        jobs = FineTuningJobs(root / "jobs", engine_info(engine_client.vllm_config, models), files,
                              ServingModelsHost(models), threads=finetune_threads(),
                              engine_call=engine_finetune_call(engine_client), require_engine=True)
        files.checks[FINE_TUNE] = jobs.check_training_file
        setattr(state, _STATE, FinetuneService(files, jobs))
        restored = await jobs.restore()  # jobs of a previous run: served again, unfinished ones resumed
        if restored:
            logger.info("vllm-slora: restored %d fine-tuning job(s) from %s", len(restored), root / "jobs")
        logger.info("vllm-slora: OpenAI Files and Fine-tuning API on /v1/files and /v1/fine_tuning/jobs "
                    "(files and job directories in %s)", root)


def engine_finetune_call(engine_client):
    """The engine's co-served finetuning control, or None when the engine does not train.

    Jobs train inside the engine (vllm_slora/finetune/coserve_*.py) only when it keeps its
    dense base weights (slora.finetune=true); the call goes to EngineCore's utility
    `slora_finetune` (patches/patch_engine_core.py).
    """
    from vllm_slora.config import SLoRAConfig

    config = SLoRAConfig.from_additional_config(engine_client.vllm_config.additional_config)
    core = getattr(engine_client, "engine_core", None)
    if config is None or not config.finetune or core is None:
        return None

    async def call(action: str, payload: dict) -> dict:
        return await core.call_utility_async("slora_finetune", action, payload)

    return call


class FinetuneService:
    def __init__(self, files: FileStore, jobs: FineTuningJobs) -> None:
        self.files, self.jobs = files, jobs


class ServingModelsHost:
    """Publishes through the server's own adapter loading (what /v1/load_lora_adapter runs)."""

    def __init__(self, models) -> None:
        self.models = models

    async def load(self, name: str, path: str, replace: bool) -> None:
        from vllm_slora.compat import LoadLoRAAdapterRequest

        request = LoadLoRAAdapterRequest(lora_name=name, lora_path=path, load_inplace=replace)
        result = await self.models.load_lora_adapter(request, base_model_name=self.models.base_model_paths[0].name)
        if not isinstance(result, str):  # vLLM's ErrorResponse
            error = result.error
            raise PublishError(error.message, int(error.code or HTTPStatus.INTERNAL_SERVER_ERROR))

    def path_of(self, name: str) -> str | None:
        lora = self.models.lora_requests.get(name)
        return None if lora is None else lora.lora_path


def engine_info(vllm_config, models) -> EngineInfo:
    model_config = vllm_config.model_config
    lora_config = vllm_config.lora_config
    parallel = vllm_config.parallel_config
    return EngineInfo(
        served_models=tuple(path.name for path in models.base_model_paths),
        model_dir=_local_dir(model_config.model, getattr(model_config, "revision", None)),
        tokenizer=_local_dir(model_config.tokenizer, getattr(model_config, "tokenizer_revision", None)),
        max_model_len=int(model_config.max_model_len),
        max_lora_rank=None if lora_config is None else int(lora_config.max_lora_rank),
        tensor_parallel_size=int(parallel.tensor_parallel_size),
        pipeline_parallel_size=int(parallel.pipeline_parallel_size),
        quantization=getattr(model_config, "quantization", None),
        trust_remote_code=bool(getattr(model_config, "trust_remote_code", False)),
    )


def _local_dir(model: str, revision: str | None) -> str:
    """A hub id resolved to its local snapshot (never downloads); directories as they are."""
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, revision=revision, local_files_only=True)
    except Exception:  # not in the local cache: jobs report the missing files when they need them
        return model


# -- routes --------------------------------------------------------------------------------------
def _answers(handler):
    """ApiError -> its JSON error body and status."""

    @functools.wraps(handler)
    async def wrapped(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)

    return wrapped


def _service(request: Request) -> FinetuneService:
    service = getattr(request.app.state, _STATE, None)
    if service is None:
        reason = getattr(request.app.state, _DISABLED, "the fine-tuning API is not initialized")
        raise ApiError(400, reason)
    return service


def _limit(request: Request, default: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"'limit' must be a positive integer, got {raw!r}", param="limit") from None


def _page(items: list[dict], more: bool) -> JSONResponse:
    return JSONResponse({
        "object": "list", "data": items, "has_more": more,
        "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None,
    })


@router.post("/v1/files")
@_answers
async def create_file(request: Request):
    from starlette.datastructures import UploadFile

    service = _service(request)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > service.files.max_bytes + _FORM_OVERHEAD:
        raise ApiError(413, f"the upload ({int(length)} bytes) is larger than the limit of "
                       f"{service.files.max_bytes} bytes", param="file", code="file_too_large")
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as e:  # not multipart, malformed, too many parts
        raise ApiError(400, f"expected a multipart/form-data body with 'file' and 'purpose': {e}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "'file' (a file part of the multipart body) is required", param="file")
        purpose = form.get("purpose")
        stored = await asyncio.to_thread(service.files.create, upload.filename, purpose, upload.file)
    finally:
        await form.close()
    return JSONResponse(stored.to_openai())


@router.get("/v1/files")
@_answers
async def list_files(request: Request):
    service = _service(request)
    q = request.query_params
    files, more = service.files.list(purpose=q.get("purpose"), after=q.get("after"), limit=_limit(request, 10000),
                                     order=q.get("order", "desc"))
    return _page([f.to_openai() for f in files], more)


@router.get("/v1/files/{file_id}")
@_answers
async def retrieve_file(file_id: str, request: Request):
    return JSONResponse(_service(request).files.get(file_id).to_openai())


@router.delete("/v1/files/{file_id}")
@_answers
async def delete_file(file_id: str, request: Request):
    await asyncio.to_thread(_service(request).files.delete, file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


@router.get("/v1/files/{file_id}/content")
@_answers
async def file_content(file_id: str, request: Request):
    files = _service(request).files
    return FileResponse(files.content_path(file_id), media_type="application/octet-stream",
                        filename=files.get(file_id).filename)


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, "the request body must be JSON") from None


@router.post("/v1/fine_tuning/jobs")
@_answers
async def create_job(request: Request):
    service = _service(request)
    return JSONResponse(await service.jobs.create(await _json_body(request)))


@router.get("/v1/fine_tuning/jobs")
@_answers
async def list_jobs(request: Request):
    jobs, more = _service(request).jobs.list(after=request.query_params.get("after"), limit=_limit(request, 20))
    return _page(jobs, more)


@router.get("/v1/fine_tuning/jobs/{job_id}")
@_answers
async def retrieve_job(job_id: str, request: Request):
    return JSONResponse(_service(request).jobs.retrieve(job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
@_answers
async def cancel_job(job_id: str, request: Request):
    return JSONResponse(_service(request).jobs.cancel(job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
@_answers
async def pause_job(job_id: str, request: Request):
    return JSONResponse(_service(request).jobs.pause(job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
@_answers
async def resume_job(job_id: str, request: Request):
    return JSONResponse(_service(request).jobs.resume(job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
@_answers
async def list_job_events(job_id: str, request: Request):
    events, more = _service(request).jobs.events(job_id, after=request.query_params.get("after"),
                                                 limit=_limit(request, 20))
    return _page(events, more)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
@_answers
async def list_job_checkpoints(job_id: str, request: Request):
    checkpoints, more = _service(request).jobs.checkpoints(job_id, after=request.query_params.get("after"),
                                                           limit=_limit(request, 10))
    return _page(checkpoints, more)


@router.get("/v1/fine_tuning/coserve")
@_answers
async def coserve_state(request: Request):
    return JSONResponse(await _service(request).jobs.coserve())


@router.post("/v1/fine_tuning/coserve")
@_answers
async def coserve_configure(request: Request):
    service = _service(request)
    return JSONResponse(await service.jobs.coserve(await _json_body(request)))
