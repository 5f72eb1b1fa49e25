"""OpenAI's streamed images: ``stream: true`` and ``partial_images`` (0-3) on ``/v1/images/generations`` and
``/v1/images/edits``, answered as Server-Sent Events.

Events (the shapes of the ``openai`` package's ``ImageGenPartialImageEvent`` / ``ImageGenCompletedEvent``, and the
``image_edit.*`` ones for edits): per image, up to ``partial_images`` ``<kind>.partial_image`` events
(``partial_image_index`` 0, 1, ... per image) and then one ``<kind>.completed`` event. Extension fields on every
event: ``image_index`` (which of the ``n`` images; a request of ``n > 1`` interleaves its images' events) and, on
``completed``, ``seed``. ``usage`` is all zeros: this server counts no tokens. An error after the stream started is
one ``error`` event (``{"type": "error", "error": {message, type, param, code}}``, the error body of the JSON
routes; the ``openai`` client raises it as ``APIError``) and the stream ends; an error before anything was
streamed (a full queue, a duplicate request id) is the route's usual JSON answer. A client that disconnects
cancels its request (the denoiser drops it at its next step).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from omni_runtime.runtime.http_common import (
    COUNTS_ITSELF,
    ERROR_SCHEMA,
    JSON_MEDIA_TYPE,
    REQUEST_ID_HEADER,
    ApiContext,
    request_id,
    serving_error,
)
from omni_runtime.runtime.image_stream import ImageEvent
from omni_runtime.runtime.requests import GenerationRequest, RequestError, show

logger = logging.getLogger(__name__)

__all__ = ["EVENT_STREAM", "MAX_PARTIAL_IMAGES", "STREAM_PROPERTIES", "parse_stream", "stream_images",
           "streamed_responses", "with_stream_fields"]

EVENT_STREAM = "text/event-stream"
MAX_PARTIAL_IMAGES = 3
GENERATION, EDIT = "image_generation", "image_edit"  # the event name prefixes of the two routes

#: the OpenAPI properties of the two fields (both routes)
STREAM_PROPERTIES: dict[str, Any] = {
    "stream": {"type": ["boolean", "null"], "default": False,
               "description": "answer with Server-Sent Events: partial images, then each final image"},
    "partial_images": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_PARTIAL_IMAGES, "default": 0,
                       "description": "previews per image, at evenly spaced denoising steps (fewer when the steps "
                                      "are too few); only with stream = true"},
}


#: the schema's rule that ``partial_images`` (non-null) needs ``stream = true`` (JSON Schema's if/then)
STREAM_RULE: dict[str, Any] = {
    "if": {"properties": {"partial_images": {"type": "integer"}}, "required": ["partial_images"]},
    "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
}


def with_stream_fields(schema: dict[str, Any]) -> dict[str, Any]:
    """A route's request schema with ``stream`` and ``partial_images`` added (and their rule)."""
    schema["properties"].update(STREAM_PROPERTIES)
    schema.update(STREAM_RULE)
    return schema


def _flag(value: Any, form: bool) -> bool:
    if form and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, bool):
        return value
    raise RequestError(f"stream={show(value)}: allowed values are true, false", "stream")


def _count(value: Any, form: bool) -> int:
    if form and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PARTIAL_IMAGES:
        raise RequestError(f"partial_images={show(value)}: must be an integer from 0 to {MAX_PARTIAL_IMAGES}",
                           "partial_images")
    return value


def parse_stream(raw: Mapping[str, Any], *, form: bool = False) -> int | None:
    """The ``stream`` / ``partial_images`` fields of a body (``form``: text form fields): None when the answer is
    not streamed, else the partial images per image; :class:`RequestError` naming the field for a bad value,
    ``partial_images`` without ``stream = true``, or a stream asked as ``response_format = url``."""
    stream = raw.get("stream")
    stream = False if stream is None else _flag(stream, form)
    partials = raw.get("partial_images")
    if partials is not None:
        partials = _count(partials, form)
        if not stream:
            raise RequestError(f"partial_images={partials}: only with stream=true (the partial images are streamed); "
                               f"allowed: stream=true, or no partial_images", "partial_images")
    if stream and raw.get("response_format") not in (None, "b64_json"):
        raise RequestError(f"response_format={show(raw.get('response_format'))}: a stream carries b64_json images; "
                           f"allowed: b64_json", "response_format")
    return (partials or 0) if stream else None


def event_schema(kind: str) -> dict[str, Any]:
    """One Server-Sent Event of a ``kind`` route (``image_generation`` / ``image_edit``): its name and its JSON data
    (OpenAPI 3.2's way: ``contentMediaType`` + ``contentSchema``)."""
    common = {"type": {"type": "string"}, "b64_json": {"type": "string"}, "created_at": {"type": "integer"},
              "size": {"type": "string"}, "quality": {"const": "auto"}, "background": {"const": "opaque"},
              "output_format": {"type": "string"}, "image_index": {"type": "integer", "minimum": 0}}
    usage = {"type": "object", "required": ["input_tokens", "input_tokens_details", "output_tokens", "total_tokens"]}
    partial = {"type": "object", "required": [*common, "partial_image_index"], "properties": {
        **common, "type": {"const": f"{kind}.partial_image"},
        "partial_image_index": {"type": "integer", "minimum": 0, "maximum": MAX_PARTIAL_IMAGES - 1}}}
    completed = {"type": "object", "required": [*common, "usage"], "properties": {
        **common, "type": {"const": f"{kind}.completed"}, "usage": usage, "seed": {"type": "integer"}}}
    error = {"type": "object", "required": ["type", "error"], "properties": {"type": {"const": "error"},
                                                                          "error": ERROR_SCHEMA["properties"]["error"]}}
    return {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"enum": [f"{kind}.partial_image", f"{kind}.completed", "error"]},
        "data": {"type": "string", "contentMediaType": JSON_MEDIA_TYPE,
                 "contentSchema": {"oneOf": [partial, completed, error]}}}}


def streamed_responses(responses: dict[int | str, dict[str, Any]], kind: str) -> dict[int | str, dict[str, Any]]:
    """A route's documented responses with the event stream added to the 200 answer (OpenAPI)."""
    ok = responses.setdefault(200, {"description": "the images", "content": {}})
    ok["description"] += (f"; with stream = true, Server-Sent Events: {kind}.partial_image (partial_images per "
                          f"image), {kind}.completed (one per image; extension field image_index), or one error event")
    ok["content"][EVENT_STREAM] = {"schema": event_schema(kind)}
    return responses


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def event_of(kind: str, req: GenerationRequest, ev: ImageEvent) -> bytes:
    """One SSE event of ``kind`` (``image_generation`` or ``image_edit``) for ``ev``."""
    body: dict[str, Any] = {
        "type": f"{kind}.completed" if ev.partial is None else f"{kind}.partial_image",
        "b64_json": base64.b64encode(ev.image).decode("ascii"), "created_at": int(time.time()),
        "size": f"{req.width}x{req.height}", "quality": "auto", "background": "opaque",
        "output_format": req.output_format, "image_index": ev.index}
    if ev.partial is None:
        body["usage"] = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                         "output_tokens": 0, "total_tokens": 0}
        body["seed"] = req.seed + ev.index
    else:
        body["partial_image_index"] = ev.partial
    return _sse(body["type"], body)


def error_event(e: BaseException, ctx: ApiContext) -> tuple[int, bytes]:
    """The ``error`` event of what the request raised after the stream started (the JSON routes' error body), with
    the status the JSON routes would have answered."""
    resp = serving_error(e, ctx)
    return resp.status_code, _sse("error", {"type": "error", **json.loads(resp.body)})


async def stream_images(request: Request, ctx: ApiContext, req: GenerationRequest, partials: int,
                        kind: str) -> Response:
    """Run ``req`` streamed (``partials`` previews per image) and answer with its events; a refusal before anything
    ran (full queue, duplicate id, unknown adapter) is the usual JSON error."""
    rid = request_id(request, ctx)
    if isinstance(rid, Response):
        return rid
    req = msgspec.structs.replace(req, partial_images=partials)
    events: asyncio.Queue[ImageEvent] = asyncio.Queue()
    task = asyncio.ensure_future(request.app.state.orch.generate(req, rid, on_event=events.put_nowait))
    await asyncio.sleep(0)  # generate refuses (raises) before its first await
    if task.done() and task.exception() is not None:
        return serving_error(task.exception(), ctx)  # type: ignore[arg-type]
    resp = StreamingResponse(_events(task, events, kind, req, ctx), media_type=EVENT_STREAM,
                             headers={REQUEST_ID_HEADER: rid, "Cache-Control": "no-cache"})
    setattr(resp, COUNTS_ITSELF, True)  # _events counts it by how it ended
    return resp


async def _events(task: asyncio.Future, events: asyncio.Queue[ImageEvent], kind: str, req: GenerationRequest,
                  ctx: ApiContext) -> AsyncIterator[bytes]:
    """The event stream of ``task`` (the request's ``generate``). Starlette cancels this generator when the client
    disconnects: the request is then cancelled (its items leave the denoiser at its next step). The request is
    counted in the request metrics by how the stream ended: 200, the error event's status, or 499 (the client left)."""
    status = 499
    try:
        while True:
            get = asyncio.ensure_future(events.get())
            try:
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not get.done():
                    get.cancel()
            if get.done() and not get.cancelled():
                yield event_of(kind, req, get.result())
                continue
            while not events.empty():
                yield event_of(kind, req, events.get_nowait())
            exc = asyncio.CancelledError("the request was cancelled") if task.cancelled() else task.exception()
            if exc is not None:
                status, event = error_event(exc, ctx)
                yield event
            else:
                status = 200
            return
    finally:
        ctx.count(status)
        if not task.done():
            logger.info("client disconnected from a stream: cancelling its request")
            task.cancel()
