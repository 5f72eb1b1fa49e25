"""``omni-runtime serve``: an OpenAI-compatible images API on FastAPI + uvicorn (uvloop).

Routes: ``POST /v1/images/generations``, ``GET /v1/requests/{id}`` (a request's progress: denoising steps done /
total; the id is the ``X-Request-Id`` header the client sent, or the one the answer carries), ``GET /v1/models``,
``GET /health``, ``GET /metrics``, ``/docs``.
Errors use the OpenAI body ``{"error": {"message", "type", "param", "code"}}``; request mistakes are 400, a
missing/wrong API key 401 (with ``WWW-Authenticate: Bearer``), a body over 1 MiB 413, a body not sent as
``application/json`` 415, a full queue 429 with ``Retry-After``, a dead stage 503, a deadline 504. The request
schema in ``/openapi.json`` is generated from ``runtime.requests.FIELDS``, the table the validation uses.
The stage processes start in the lifespan hook, so uvicorn accepts connections only once every stage is ready;
SIGINT/SIGTERM stop uvicorn, whose lifespan shutdown stops the stages and sweeps their shared memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from omni_runtime.runtime.config import ConfigError, RuntimeConfig
from omni_runtime.runtime.http_common import (
    JSON_MEDIA_TYPE,
    BodyTooLarge,
    error_response,
    is_json_content_type,
    read_body,
)
from omni_runtime.runtime.lora_api import add_lora_routes
from omni_runtime.runtime.metrics import Metrics
from omni_runtime.runtime.orchestrator import Orchestrator, ServingError
from omni_runtime.runtime.progress import valid_request_id
from omni_runtime.runtime.requests import RequestError, WorkCaps, openapi_request_schema, parse_request, show
from omni_runtime.runtime.video_api import add_video_routes

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"  # the client's id for GET /v1/requests/{id}; echoed in the answer

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}},
}
_IMAGES_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["created", "data"],
    "properties": {"created": {"type": "integer"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["b64_json", "seed"], "properties": {
            "b64_json": {"type": "string"}, "revised_prompt": {"type": "null"}, "seed": {"type": "integer"}}}}},
}
# Every answer of POST /v1/images/generations but the client-disconnect 499 (nobody reads that one).
_ERRORS = {
    400: "invalid_json / invalid_request: the body or a field is wrong (param names it), or the request is more "
         "work than the config's caps allow",
    401: "invalid_api_key: api_key is set and 'Authorization: Bearer <key>' is missing or wrong",
    413: "body_too_large: the body is over 1 MiB",
    409: "duplicate_request_id: a request with this X-Request-Id is in flight",
    415: "unsupported_media_type: the body is not sent as Content-Type: application/json",
    429: "queue_full: a stage queue is full; see Retry-After",
    500: "internal_error / stage_failed: a bug; the server keeps serving",
    503: "stage_unavailable: a stage process died, or the connection limit was reached",
    504: "deadline_exceeded: request_timeout_s passed",
}


def generations_responses() -> dict[int | str, dict[str, Any]]:
    """The documented responses of the generations route (OpenAPI)."""
    out: dict[int | str, dict[str, Any]] = {
        200: {"description": "the images", "content": {JSON_MEDIA_TYPE: {"schema": _IMAGES_SCHEMA}}}}
    for status, text in _ERRORS.items():
        out[status] = {"description": text, "content": {JSON_MEDIA_TYPE: {"schema": _ERROR_SCHEMA}}}
    out[429]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    out[401]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}
    return out


def _model_id(cfg: RuntimeConfig) -> str:
    return Path(cfg.model.path).name


def create_app(cfg: RuntimeConfig, orchestrator: Orchestrator | None = None) -> FastAPI:
    """The app; its lifespan starts (and at exit stops) an :class:`Orchestrator` for ``cfg``."""
    metrics = Metrics()
    caps = WorkCaps.from_config(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        orch = orchestrator or Orchestrator(cfg, metrics)
        app.state.orch = orch

        def fatal(reason: str) -> None:  # the orchestrator cannot serve any more: stop serving, exit non-zero
            app.state.fatal = reason
            request_exit = getattr(app.state, "request_exit", None)
            if request_exit is not None:
                request_exit()

        orch.on_fatal = fatal
        try:
            await orch.start()
            yield
        finally:
            await orch.shutdown()

    app = FastAPI(title="omni-runtime", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible image generation served by staged diffusion processes.")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", []) if x != "body"]
        return error_response(400, f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}",
                              "invalid_request_error", ".".join(loc) or None, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # exc.headers: the Allow header of a 405 (RFC 9110 15.5.6)
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", None, None,
                              exc.headers)

    def _auth(request: Request) -> JSONResponse | None:
        key = cfg.server.api_key
        if not key:
            return None
        got = request.headers.get("authorization", "")
        if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].encode(), key.encode()):
            return error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                  "invalid_request_error", None, "invalid_api_key",
                                  {"WWW-Authenticate": 'Bearer realm="omni-runtime"'})
        return None

    security = [{"bearer": []}] if cfg.server.api_key else []

    @app.post("/v1/images/generations", responses=generations_responses(), openapi_extra={
        "security": security,
        "requestBody": {"required": True, "content": {JSON_MEDIA_TYPE: {"schema": openapi_request_schema()}}}})
    async def generations(request: Request) -> Response:
        denied = _auth(request)
        if denied is not None:
            metrics.requests.labels(status="401").inc()
            return denied
        resp = await _generations(request)
        metrics.requests.labels(status=str(resp.status_code)).inc()
        return resp

    async def _generations(request: Request) -> Response:
        # A cross-site form post can send text/plain without a CORS preflight; JSON it cannot (issue 14, #10).
        if not is_json_content_type(request.headers.get("content-type")):
            return error_response(415, f"Content-Type {show(request.headers.get('content-type'))}: the body must be "
                                  f"sent as {JSON_MEDIA_TYPE}", "invalid_request_error", None,
                                  "unsupported_media_type")
        try:
            body = await read_body(request)
        except BodyTooLarge as e:
            return error_response(413, str(e), "invalid_request_error", None, "body_too_large",
                                  {"Connection": "close"})
        except ClientDisconnect:
            return Response(status_code=499)
        try:
            raw = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return error_response(400, f"the body is not valid JSON: {e}", "invalid_request_error", None,
                                  "invalid_json")
        except RecursionError:  # e.g. 50,000 nested '[': the parser gives up; it is still the client's mistake
            return error_response(400, "the body is not valid JSON: nested too deeply", "invalid_request_error",
                                  None, "invalid_json")
        try:
            req = parse_request(raw, caps=caps)
        except RequestError as e:
            metrics.errors.labels(stage="http", kind="invalid_request").inc()
            return error_response(400, str(e), "invalid_request_error", e.param, "invalid_request")
        rid = request.headers.get(REQUEST_ID_HEADER)
        if rid is not None and not valid_request_id(rid):
            metrics.errors.labels(stage="http", kind="invalid_request").inc()
            return error_response(400, f"{REQUEST_ID_HEADER}={show(rid)}: allowed: 1 to 64 characters of A-Z, a-z, "
                                  f"0-9, '.', '_', '-'", "invalid_request_error", REQUEST_ID_HEADER,
                                  "invalid_request")
        rid = rid or uuid.uuid4().hex
        orch: Orchestrator = request.app.state.orch
        task = asyncio.ensure_future(orch.generate(req, rid))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.1)
                if not task.done() and await request.is_disconnected():
                    logger.info("client disconnected: cancelling its request")
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    return Response(status_code=499)
            images = task.result()
        except ServingError as e:
            headers = {"Retry-After": str(e.retry_after)} if hasattr(e, "retry_after") else None
            return error_response(e.status, str(e), e.kind, None, e.code, headers)
        except Exception as e:  # a bug of ours: still an OpenAI-style body, and the server keeps serving
            logger.exception("request failed")
            metrics.errors.labels(stage="http", kind="internal_error").inc()
            return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error", None,
                                  "internal_error")
        finally:
            if not task.done():
                task.cancel()
        return JSONResponse({"created": int(time.time()),
                             "data": [{"b64_json": base64.b64encode(img).decode("ascii"), "revised_prompt": None,
                                       "seed": seed} for img, seed in zip(images, req.seeds(), strict=True)]},
                            headers={REQUEST_ID_HEADER: rid})

    @app.get("/v1/requests/{request_id}", responses={
        401: {"description": "invalid_api_key", "content": {JSON_MEDIA_TYPE: {"schema": _ERROR_SCHEMA}}},
        404: {"description": "not_found: no request with this id is in flight or recently finished",
              "content": {JSON_MEDIA_TYPE: {"schema": _ERROR_SCHEMA}}}})
    async def request_progress(request_id: str, request: Request) -> Response:
        """A request's progress: ``status`` (queued, running, completed, failed, cancelled), ``steps_done`` /
        ``steps_total`` (denoising steps over its images) and the same per image; kept for the last 1024
        finished requests."""
        denied = _auth(request)
        if denied is not None:
            return denied
        p = request.app.state.orch.progress.get(request_id)
        if p is None:
            return error_response(404, f"no request with id {show(request_id)} is in flight or recently finished",
                                  "invalid_request_error", "request_id", "not_found")
        return JSONResponse(p.as_json())

    @app.get("/v1/models", responses={
        401: {"description": "invalid_api_key", "content": {JSON_MEDIA_TYPE: {"schema": _ERROR_SCHEMA}}}})
    async def models(request: Request) -> Response:
        denied = _auth(request)
        if denied is not None:
            return denied
        return JSONResponse({"object": "list", "data": [
            {"id": _model_id(cfg), "object": "model", "created": int(request.app.state.orch.started_at),
             "owned_by": "omni-runtime"}]})

    @app.get("/health", responses={503: {"description": "a stage has no replica that can serve (hung, "
                                                          "restarting) or the server failed"}})
    async def health(request: Request) -> Response:
        """200 ``ok`` when every replica is ready, 200 ``degraded`` when a replica is not but every stage has one
        that is, 503 ``unavailable`` while a stage has none; ``stages``: readiness by replica; ``replicas``: each
        replica's state (ready, starting, hung, restarting), generation and last failure."""
        orch = request.app.state.orch
        stages = orch.health()
        serving = all(any(v) for v in stages.values())
        status = "ok" if all(all(v) for v in stages.values()) else "degraded" if serving else "unavailable"
        body: dict[str, Any] = {"status": status, "stages": stages}
        replica_health = getattr(orch, "replica_health", None)
        if replica_health is not None:
            body["replicas"] = replica_health()
        return JSONResponse(body, status_code=200 if serving else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        401: {"description": "invalid_api_key (metrics_require_key)",
              "content": {JSON_MEDIA_TYPE: {"schema": _ERROR_SCHEMA}}}})
    async def metrics_route(request: Request) -> Response:
        if cfg.server.metrics_require_key:
            denied = _auth(request)
            if denied is not None:
                return denied
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            # FastAPI's OpenAPI model holds bounds as floats (2**63 - 10 would become 2**63): put the table's in
            body = schema["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"][JSON_MEDIA_TYPE]
            body["schema"] = openapi_request_schema()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.metrics = metrics
    add_lora_routes(app, _auth)  # POST/GET /v1/loras, DELETE /v1/loras/{name}
    add_video_routes(app, cfg, _auth)  # /v1/videos (runtime/video_api.py)
    return app


def check_listen(host: str, port: int) -> None:
    """Bind ``host:port`` once and let go, before any stage starts: a busy port or a bad host is one error at
    once instead of a failure after every stage has loaded. (uvicorn binds for real only when the stages are
    ready, so clients are refused, not left hanging, until then.)"""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind(addr)
    except OSError as e:
        raise ConfigError(f"server.host = {host!r}, server.port = {port}: cannot listen there "
                          f"({e.strerror or e}); allowed: a free port on a local address (--host/--port "
                          f"override the config)") from None


def uvicorn_config(app: FastAPI, cfg: RuntimeConfig, loop: str = "auto") -> Any:
    """uvicorn's settings from ``[server]``: h11 with header/body read deadlines, the keep-alive timeout and the
    connection limit (beyond it uvicorn answers 503)."""
    import uvicorn

    from omni_runtime.runtime.http_protocol import guarded_h11_protocol

    s = cfg.server
    return uvicorn.Config(app, host=s.host, port=s.port, loop=loop, log_level="info", timeout_graceful_shutdown=5,
                          http=guarded_h11_protocol(s.header_timeout_s, s.body_timeout_s),
                          timeout_keep_alive=s.keep_alive_timeout_s,  # type: ignore[arg-type]
                          limit_concurrency=s.max_connections)


def serve(cfg: RuntimeConfig) -> int:
    """Run the server until SIGINT/SIGTERM; returns the exit code (1 if the stages never became ready, or if the
    frontend failed while serving: then it stops at once instead of answering 504 forever). Runs the
    preflight and a bind check first: a problem there raises ``ConfigError``/``CheckpointError`` (CLI exit 2)."""
    import uvicorn

    from omni_runtime.runtime.preflight import preflight

    for line in preflight(cfg):  # machine, host, model directory: one error before any stage starts
        logger.info("preflight: %s", line)
    check_listen(cfg.server.host, cfg.server.port)
    try:
        import setproctitle

        setproctitle.setproctitle(f"omni-runtime: frontend {cfg.server.host}:{cfg.server.port}")
    except ImportError:  # pragma: no cover - it is a dependency
        pass
    app = create_app(cfg)
    loop = "uvloop"
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - Windows
        loop = "asyncio"
    server = uvicorn.Server(uvicorn_config(app, cfg, loop))
    app.state.request_exit = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    except SystemExit:  # uvicorn exits with 3 when the lifespan startup (the stages) or the bind failed
        if server.started:
            raise
    if not server.started:
        logger.error("not serving: the stage processes did not become ready or %s:%d could not be bound; "
                     "the log lines above say why", cfg.server.host, cfg.server.port)
        return 1
    fatal = getattr(app.state, "fatal", None)
    if fatal:
        logger.error("stopped serving because the frontend failed: %s", fatal)
        return 1
    return 0
