"""What every HTTP API module shares: the OpenAI error body, the JSON media type check and the capped body read.

``runtime/server.py`` (the images API, health, metrics) and ``runtime/lora_api.py`` (``/v1/loras``) both answer
through these, so an error looks the same on every route.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

JSON_MEDIA_TYPE = "application/json"
MAX_BODY_BYTES = 1 << 20  # the default cap of one request body


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
