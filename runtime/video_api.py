"""The video routes (issue 24), the job shape of OpenAI's Videos API as vLLM-Omni and SGLang serve it:

- ``POST /v1/videos`` (JSON or multipart form): starts a job, answers its video object
  ``{id, object: "video", model, status, progress, created_at, completed_at, size, seconds, error}``;
- ``GET /v1/videos`` (list), ``GET /v1/videos/{id}``, ``DELETE /v1/videos/{id}`` (cancels a running job at the next
  denoising step and removes it and its files);
- ``GET /v1/videos/{id}/content?variant=video|thumbnail|frames``: the mp4 (H.264), the first frame's PNG, or a zip
  of every frame as a lossless PNG (our extension, for exact comparison);
- ``POST /v1/videos/sync``: the same body, answered with the mp4 itself once it is done.

Validation is ``runtime.video_request.parse_video``'s (that of every edge); the job store ``runtime.video_jobs``'s.
An image model answers these routes with a 400 naming the model's family, and a video model answers
``/v1/images/generations`` with a 400 saying to use ``/v1/videos``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from omni_runtime.comm import instance as rt_instance
from omni_runtime.runtime.config import RuntimeConfig
from omni_runtime.runtime.http_common import (
    IMAGES_SCHEMA,
    ApiContext,
    BodyTooLarge,
    error_response,
    is_json_content_type,
    read_body,
)
from omni_runtime.runtime.image_stream import ImageEvent
from omni_runtime.runtime.orchestrator import ServingError
from omni_runtime.runtime.requests import RequestError, show
from omni_runtime.runtime.served_model import served_model_of
from omni_runtime.runtime.video_files import decode_frames, encode_mp4, thumbnail
from omni_runtime.runtime.video_jobs import FILES, StoreFull, VideoJob, VideoJobStore
from omni_runtime.runtime.video_request import (
    VideoRequest,
    parse_video,
    video_request_schema,
)

logger = logging.getLogger(__name__)

__all__ = ["register"]

VARIANTS = tuple(FILES)

#: the video object (``VideoJob.as_json``): the OpenAI Videos API's fields, ours (``num_frames``, ``fps``) and, once
#: the stages answered, the images routes' extension fields ``cache`` and ``peak_memory_mb``
JOB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "model", "status", "progress", "created_at", "completed_at", "size", "seconds",
                 "num_frames", "fps", "error"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "video"}, "model": {"type": "string"},
        "status": {"enum": ["queued", "in_progress", "completed", "failed"]},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100,
                     "description": "percent of the denoising steps done; 100 once the files are written"},
        "created_at": {"type": "integer"}, "completed_at": {"type": ["integer", "null"]},
        "size": {"type": "string", "description": "WIDTHxHEIGHT"}, "seconds": {"type": "string"},
        "num_frames": {"type": "integer"}, "fps": {"type": "integer"},
        "error": {"type": ["object", "null"], "required": ["code", "message"],
                  "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
        "cache": {**IMAGES_SCHEMA["properties"]["cache"], "description": "extension, once a job with a cache request "
                  "is done: row-steps (branch x video x step) and transformer blocks, in all and skipped"},
        "peak_memory_mb": IMAGES_SCHEMA["properties"]["peak_memory_mb"],
    },
}


def _job_answer(text: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The documented 200 answer of a route that answers with the video object (or ``schema``)."""
    return {"description": text, "content": {"application/json": {"schema": schema or JOB_SCHEMA}}}


def _bad(e: RequestError) -> Response:
    return error_response(400, str(e), "invalid_request_error", e.param, "invalid_request")


def _not_found(job_id: str) -> Response:
    return error_response(404, f"no video job with id {show(job_id)} (unknown, expired or deleted)",
                          "invalid_request_error", "video_id", "not_found")


def _serving_error(e: Exception) -> dict[str, str]:
    if isinstance(e, ServingError):
        return {"code": e.code or "stage_failed", "message": str(e)}
    return {"code": "internal_error", "message": f"{type(e).__name__}: {e}"}


async def write_files(directory: Path, frames_zip: bytes, fps: int) -> None:
    """The job's frames zip, mp4 and thumbnail (the mp4 encoded off the event loop)."""
    def write() -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        (directory / FILES["frames"][0]).write_bytes(frames_zip)
        (directory / FILES["thumbnail"][0]).write_bytes(thumbnail(frames_zip))
        (directory / FILES["video"][0]).write_bytes(encode_mp4(decode_frames(frames_zip), fps))
    await asyncio.to_thread(write)


class _ImagesToVideoModel:
    """Pure ASGI middleware (a ``BaseHTTPMiddleware`` would hide client disconnects from the image route): a video
    model answers ``POST /v1/images/generations`` with a 400 saying to use ``/v1/videos``."""

    def __init__(self, app: Any, cfg: RuntimeConfig) -> None:
        self.app = app
        self.cfg = cfg

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/images/generations":
            model = served_model_of(self.cfg)  # read once, as the image route reads it (None: unreadable, logged)
            if model is not None and model.video:
                resp = error_response(400, f"the served model is a {model.family} video model; it answers "
                                      f"POST /v1/videos, not /v1/images/generations", "invalid_request_error",
                                      "model", "invalid_request")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _parse(request: Request, cfg: RuntimeConfig) -> VideoRequest | Response:
    """The body (JSON or multipart) as a checked video request, or the error answer."""
    ctype = request.headers.get("content-type") or ""
    try:
        if ctype.split(";")[0].strip().lower() == "multipart/form-data":
            form = await request.form()
            if any(not isinstance(v, str) for v in form.values()):
                return _bad(RequestError("input_reference: image-to-video is not served; allowed: text fields "
                                         "only", "input_reference"))
            raw, is_form = dict(form), True
        elif is_json_content_type(ctype):
            raw, is_form = json.loads(await read_body(request)), False
        else:
            return error_response(415, f"Content-Type {show(ctype)}: send application/json or "
                                  f"multipart/form-data", "invalid_request_error", None, "unsupported_media_type")
    except BodyTooLarge as e:
        return error_response(413, str(e), "invalid_request_error", None, "body_too_large")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return error_response(400, f"the body is not valid JSON: {e}", "invalid_request_error", None,
                              "invalid_json")
    try:
        return parse_video(raw, cfg, form=is_form)  # the one check of every edge (runtime.video_request)
    except RequestError as e:
        return _bad(e)


def _view(job: VideoJob, request: Request) -> dict[str, Any]:
    """The job's video object, its status and progress from the orchestrator's progress book."""
    p = request.app.state.orch.progress.get(job.id)
    if p is not None and p.status == "running" and job.status == "queued":
        job.status = "in_progress"
    steps = (sum(p.done), p.n * p.steps) if p is not None else None
    return job.as_json(steps)


#: the latest preview's first frame of a running job (``[video] previews``), in the job's directory
PREVIEW_FILE = "preview.png"


async def _run(store: VideoJobStore, job: VideoJob, vr: VideoRequest, orch: Any, previews: int = 0) -> None:
    """The job's task: the request through the stages, then its files. With ``previews`` the denoiser's predicted
    clean latents at that many evenly spaced steps are decoded (``runtime.image_stream``, at the VAE's lower
    preview priority) and the latest one's first frame is the thumbnail while the job runs."""
    req, on_event = vr.req, None
    if previews:
        req = msgspec.structs.replace(req, partial_images=previews)
        directory = store.dir(job)

        def on_event(event: ImageEvent) -> None:
            if event.partial is not None:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                tmp = directory / f".{PREVIEW_FILE}.tmp"
                tmp.write_bytes(thumbnail(event.image))
                tmp.replace(directory / PREVIEW_FILE)
    try:
        frames_zip = (await orch.generate(req, job.id, report=job.report, on_event=on_event))[0]
        await write_files(store.dir(job), frames_zip, vr.fps)
        store.finish(job, "completed")
    except asyncio.CancelledError:
        raise
    except Exception as e:  # the job fails; the server goes on
        if not isinstance(e, (ServingError, RequestError)):
            logger.exception("video job %s failed", job.id)
        store.finish(job, "failed", _serving_error(e) if not isinstance(e, RequestError)
                     else {"code": "invalid_request", "message": str(e)})


def register(app: FastAPI, ctx: ApiContext) -> None:
    """Register the routes on ``app`` (one of ``server.API_MODULES``)."""
    _add_routes(app, ctx)


def _add_routes(app: FastAPI, ctx: ApiContext) -> None:
    """Register the routes on ``app`` (each behind auth and counted in the request metrics: ``ctx.counted``); the job
    store closes with the app's lifespan."""
    cfg = ctx.cfg
    vcfg = cfg.video
    store = VideoJobStore(lambda: rt_instance.run_dir() / "videos", vcfg.max_jobs, vcfg.job_ttl_s)
    app.state.videos = store

    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            try:
                yield state
            finally:
                await store.close()  # before the orchestrator stops: jobs cancelled, files removed

    app.router.lifespan_context = lifespan

    app.add_middleware(_ImagesToVideoModel, cfg=cfg)

    body = {"required": True, "content": {ct: {"schema": video_request_schema()}
                                          for ct in ("application/json", "multipart/form-data")}}
    _job_routes(app, cfg, store, ctx.counted, body)
    _file_routes(app, cfg, store, ctx.counted, body)


def _job_routes(app: FastAPI, cfg: RuntimeConfig, store: VideoJobStore, counted: Callable[[Any], Any],
                body: dict[str, Any]) -> None:
    """POST /v1/videos, GET /v1/videos, GET and DELETE /v1/videos/{id}."""
    model_id = Path(cfg.model.path).name

    @app.post("/v1/videos", openapi_extra={"requestBody": body}, responses={
        200: _job_answer("the new job's video object"),
        400: {"description": "invalid_request: a field (param names it) or a [video] cap"},
        415: {"description": "unsupported_media_type"}, 429: {"description": "too_many_jobs"}})
    @counted
    async def create_video(request: Request) -> Response:
        vr = await _parse(request, cfg)
        if isinstance(vr, Response):
            return vr
        job = VideoJob(id=f"video_{uuid.uuid4().hex}", model=model_id, size=vr.size, seconds=vr.seconds,
                       fps=vr.fps, num_frames=vr.req.num_frames)
        try:
            store.add(job)
        except StoreFull as e:
            return error_response(429, str(e), "rate_limit_error", None, "too_many_jobs", {"Retry-After": "10"})
        job.task = asyncio.ensure_future(_run(store, job, vr, request.app.state.orch, cfg.video.previews))
        return JSONResponse(_view(job, request))

    @app.get("/v1/videos", responses={200: _job_answer("the jobs kept", {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": JOB_SCHEMA}}})})
    @counted
    async def list_videos(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_view(j, request) for j in store.list()]})

    @app.get("/v1/videos/{video_id}", responses={200: _job_answer("the job's video object"),
                                                 404: {"description": "not_found"}})
    @counted
    async def get_video(video_id: str, request: Request) -> Response:
        job = store.get(video_id)
        return _not_found(video_id) if job is None else JSONResponse(_view(job, request))

    @app.delete("/v1/videos/{video_id}")
    @counted
    async def delete_video(video_id: str, request: Request) -> Response:
        job = await store.delete(video_id)
        if job is None:
            return _not_found(video_id)
        return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})


def _file_routes(app: FastAPI, cfg: RuntimeConfig, store: VideoJobStore, counted: Callable[[Any], Any],
                 body: dict[str, Any]) -> None:
    """GET /v1/videos/{id}/content and POST /v1/videos/sync."""
    @app.get("/v1/videos/{video_id}/content")
    @counted
    async def video_content(video_id: str, request: Request, variant: str = "video") -> Response:
        if variant not in VARIANTS:
            return _bad(RequestError(f"variant={show(variant)}: allowed values are {', '.join(VARIANTS)}",
                                     "variant"))
        job = store.get(video_id)
        if job is None:
            return _not_found(video_id)
        if job.status != "completed":
            preview = store.dir(job) / PREVIEW_FILE
            if variant == "thumbnail" and job.status in ("queued", "in_progress") and preview.is_file():
                return Response(preview.read_bytes(), media_type="image/png")  # the latest preview's first frame
            hint = " (a thumbnail: the latest preview while it runs, with [video] previews > 0)" \
                if variant == "thumbnail" else ""
            return error_response(409, f"video {job.id} is {job.status}; its content exists once it is completed"
                                  f"{hint}", "invalid_request_error", "video_id", "video_not_ready")
        name, media = FILES[variant]
        return FileResponse(store.dir(job) / name, media_type=media, filename=f"{job.id}_{name}")

    @app.post("/v1/videos/sync", openapi_extra={"requestBody": body},
              responses={200: {"description": "the mp4", "content": {"video/mp4": {}}}})
    @counted
    async def create_video_sync(request: Request) -> Response:
        vr = await _parse(request, cfg)
        if isinstance(vr, Response):
            return vr
        task = asyncio.ensure_future(request.app.state.orch.generate(vr.req, f"video_{uuid.uuid4().hex}"))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.1)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    return Response(status_code=499)
            frames_zip = task.result()[0]
        except ServingError as e:
            return error_response(e.status, str(e), e.kind, None, e.code)
        except Exception as e:
            logger.exception("video request failed")
            return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error", None,
                                  "internal_error")
        finally:
            if not task.done():
                task.cancel()
        mp4 = await asyncio.to_thread(lambda: encode_mp4(decode_frames(frames_zip), vr.fps))
        return Response(mp4, media_type="video/mp4")
