"""What every HTTP API module shares: the OpenAI error body, auth, the one mapper from errors to answers, the JSON
media type check, the capped body read, and the images answer.

Each API is a module with ``register(app, ctx)`` (``runtime/images_api.py``, ``runtime/edits_api.py``,
``runtime/ops_api.py``, ``runtime/lora_api.py``, ...); ``runtime/server.py`` composes them over one
:class:`ApiContext`, so an error, a 401 and an images answer look the same on every route.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from omni_runtime.runtime.metrics import Metrics
from omni_runtime.runtime.orchestrator import ServingError
from omni_runtime.runtime.progress import valid_request_id
from omni_runtime.runtime.requests import GenerationRequest, WorkCaps, show

logger = logging.getLogger(__name__)

JSON_MEDIA_TYPE = "application/json"
MAX_BODY_BYTES = 1 << 20  # the default cap of one request body
REQUEST_ID_HEADER = "X-Request-Id"  # the client's id for GET /v1/requests/{id}; echoed in the answer
#: the attribute of a response that counts itself in the request metrics when it ends (``ApiContext.counted``)
COUNTS_ITSELF = "counts_itself"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}},
}
IMAGES_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["created", "data"],
    "properties": {"created": {"type": "integer"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["b64_json", "seed"], "properties": {
            "b64_json": {"type": "string"}, "revised_prompt": {"type": "null"}, "seed": {"type": "integer"}}}},
        "cache": {"type": "object", "description": "extension, with a cache request: row-steps (branch x image x "
                  "step) and transformer blocks, in all and skipped by the cache, summed over the images",
                  "required": ["method", "steps", "cached_steps", "blocks", "cached_blocks"], "properties": {
                      "method": {"type": "string"}, "steps": {"type": "integer"}, "cached_steps": {"type": "integer"},
                      "blocks": {"type": "integer"}, "cached_blocks": {"type": "integer"}}},
        "peak_memory_mb": {"type": "object", "description": "extension: each stage's peak memory in MB while it "
                           "computed this request's images (its driver rank; CPU: the process's RSS high-water "
                           "mark, CUDA: max_memory_allocated), by stage name",
                           "additionalProperties": {"type": "number"}}},
}
#: the answers every images route (generations, edits) shares; a route adds its own (413, 415 texts)
IMAGES_ERRORS = {
    400: "invalid_request: a field is wrong (param names it), or the request is more work than the config's caps "
         "allow",
    401: "invalid_api_key: api_key is set and 'Authorization: Bearer <key>' is missing or wrong",
    409: "duplicate_request_id: a request with this X-Request-Id is in flight",
    429: "queue_full: a stage queue is full; see Retry-After",
    500: "internal_error / stage_failed: a bug; the server keeps serving",
    503: "stage_unavailable: a stage process died, or the connection limit was reached",
    504: "deadline_exceeded: request_timeout_s passed",
}


class BodyTooLarge(Exception):
    """A request body past its cap (HTTP 413)."""


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, read chunk by chunk; raises :class:`BodyTooLarge` as soon as it passes ``limit`` bytes
    (a declared Content-Length over it is refused before reading anything; a chunked body is never held whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {declared} bytes: at most {limit} are allowed")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body of more than {limit} bytes: at most {limit} are allowed")
        chunks.append(chunk)
    return b"".join(chunks)


def is_json_content_type(value: str | None) -> bool:
    """``application/json``, optionally with parameters (``; charset=utf-8``)."""
    return bool(value) and value.split(";", 1)[0].strip().lower() == JSON_MEDIA_TYPE  # type: ignore[union-attr]


def error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def invalid(message: str, param: str | None = None, code: str = "invalid_request", status: int = 400,
            headers: dict[str, str] | None = None) -> JSONResponse:
    """A client mistake (4xx, ``invalid_request_error``)."""
    return error_response(status, message, "invalid_request_error", param, code, headers)


def documented(errors: dict[int, str], ok: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a route: ``ok`` (the 200 schema) and each error status with the error body."""
    out: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        out[200] = {"description": "the images", "content": {JSON_MEDIA_TYPE: {"schema": ok}}}
    for status, text in sorted(errors.items()):
        out[status] = {"description": text, "content": {JSON_MEDIA_TYPE: {"schema": ERROR_SCHEMA}}}
    if 429 in out:
        out[429]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    if 401 in out:
        out[401]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}
    return out


@dataclass
class ApiContext:
    """What the API modules share: the config, the metrics, the work caps, auth, and the OpenAPI patches (each
    module may fix up the generated schema, e.g. to put in bounds FastAPI would round)."""

    cfg: Any  # runtime.config.RuntimeConfig
    metrics: Metrics
    caps: WorkCaps
    openapi_patches: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)

    @property
    def security(self) -> list[dict[str, list[str]]]:
        """The OpenAPI security of a route that takes the API key."""
        return [{"bearer": []}] if self.cfg.server.api_key else []

    def auth(self, request: Request) -> JSONResponse | None:
        """A 401 when ``[server] api_key`` is set and the request does not carry it; else None."""
        key = self.cfg.server.api_key
        if not key:
            return None
        got = request.headers.get("authorization", "")
        if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].encode(), key.encode()):
            return invalid("missing or invalid API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key",
                           401, {"WWW-Authenticate": 'Bearer realm="omni-runtime"'})
        return None

    def counted(self, handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        """``handler`` (a route whose parameters include ``request: Request``; FastAPI reads them through
        ``functools.wraps``) behind auth, its answer counted in ``omni_requests_total{status}``. A response that
        counts itself once it ends (:data:`COUNTS_ITSELF`: a stream, whose status is known only then) is left to it."""

        @functools.wraps(handler)
        async def run(*args: Any, **kwargs: Any) -> Response:
            resp = self.auth(kwargs["request"]) or await handler(*args, **kwargs)
            if not getattr(resp, COUNTS_ITSELF, False):
                self.count(resp.status_code)
            return resp
        return run

    def count(self, status: int) -> None:
        """One answered request in ``omni_requests_total{status}``."""
        self.metrics.requests.labels(status=str(status)).inc()

    def bad_request(self, message: str, param: str | None) -> JSONResponse:
        """A 400 for a request the edge refused (counted as an http invalid_request error)."""
        self.metrics.errors.labels(stage="http", kind="invalid_request").inc()
        return invalid(message, param)


def install_error_handlers(app: FastAPI) -> None:
    """FastAPI's own errors (validation, 404/405) in the OpenAI error body."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", []) if x != "body"]
        return invalid(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}", ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # exc.headers: the Allow header of a 405 (RFC 9110 15.5.6)
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", None, None, exc.headers)


def request_id(request: Request, ctx: ApiContext) -> str | JSONResponse:
    """The client's ``X-Request-Id`` (checked), a new id when absent, or the 400 for a bad one."""
    rid = request.headers.get(REQUEST_ID_HEADER)
    if rid is not None and not valid_request_id(rid):
        return ctx.bad_request(f"{REQUEST_ID_HEADER}={show(rid)}: allowed: 1 to 64 characters of A-Z, a-z, 0-9, '.', "
                               f"'_', '-'", REQUEST_ID_HEADER)
    return rid or uuid.uuid4().hex


def serving_error(e: BaseException, ctx: ApiContext) -> JSONResponse:
    """The one mapping from what the orchestrator raised to an answer: a :class:`ServingError` carries its status
    and code (429 with Retry-After, 503, 504, 400, 409); anything else is our bug: 500, and the server goes on."""
    if isinstance(e, ServingError):
        headers = {"Retry-After": str(e.retry_after)} if hasattr(e, "retry_after") else None
        return error_response(e.status, str(e), e.kind, None, e.code, headers)
    logger.error("request failed", exc_info=e)
    ctx.metrics.errors.labels(stage="http", kind="internal_error").inc()
    return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error", None, "internal_error")


async def run_images(request: Request, ctx: ApiContext, req: GenerationRequest) -> Response:
    """Run ``req`` on the orchestrator and answer with its images (``b64_json``, the seed of each), cancelling it
    when the client disconnects (499, which nobody reads); errors through :func:`serving_error`."""
    rid = request_id(request, ctx)
    if isinstance(rid, Response):
        return rid
    report: dict[str, Any] = {}  # the response's extension fields (cache, peak_memory_mb)
    task = asyncio.ensure_future(request.app.state.orch.generate(req, rid, report=report))
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
    except Exception as e:
        return serving_error(e, ctx)
    finally:
        if not task.done():
            task.cancel()
    return JSONResponse({"created": int(time.time()),
                         "data": [{"b64_json": base64.b64encode(img).decode("ascii"), "revised_prompt": None,
                                   "seed": seed} for img, seed in zip(images, req.seeds(), strict=True)],
                         **report},
                        headers={REQUEST_ID_HEADER: rid})
