"""The LoRA routes (issue 25): ``POST /v1/loras`` (register a file), ``GET /v1/loras``, ``DELETE /v1/loras/{name}``.

All three take the API key (``[server] api_key``) like the other ``/v1`` routes. A POST body is
``{"name": str, "path": str}``: the path must lie under ``[lora] allowed_roots`` (403 otherwise; resolved with its
symlinks), and the file is checked against the model before it is registered (400 naming what does not fit: another
model's adapter, mismatched shapes, a corrupt file, text-encoder LoRA, a key layout diffusers' converters do not
read; kohya and other layouts they read are converted first). The registry is the orchestrator's
(``runtime.lora_registry``); the denoiser ranks load an adapter registered here when a request first names it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from omni_runtime.runtime.http_common import (
    JSON_MEDIA_TYPE,
    BodyTooLarge,
    error_response,
    is_json_content_type,
    read_body,
)
from omni_runtime.runtime.lora_registry import LoraForbidden, LoraRegistry

logger = logging.getLogger(__name__)

__all__ = ["add_lora_routes", "register"]

MAX_LORA_BODY = 64 << 10


def register(app: FastAPI, ctx: Any) -> None:
    """The API module entry point (``runtime.server`` composes the modules): the routes behind ``ctx.auth``."""
    add_lora_routes(app, ctx.auth)


def add_lora_routes(app: FastAPI, auth: Callable[[Request], Response | None]) -> None:
    """Register the routes on ``app`` (``create_app`` calls it); ``auth(request)``: a 401 response or None."""

    def registry(request: Request) -> LoraRegistry:
        return request.app.state.orch.loras

    body_schema = {"type": "object", "required": ["name", "path"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "description": "the name requests use in their lora field"},
        "path": {"type": "string", "description": "a .safetensors LoRA file (diffusers' layout, or one diffusers' "
                                                  "loader converts: kohya, ...), under one of "
                                                  "[lora] allowed_roots"}}}

    @app.post("/v1/loras", openapi_extra={
        "requestBody": {"required": True, "content": {JSON_MEDIA_TYPE: {"schema": body_schema}}}})
    async def load_lora(request: Request) -> Response:
        """Register (load) an adapter: 200 with its entry; 400 for a file that does not fit the model; 403 for a
        path outside ``[lora] allowed_roots``."""
        denied = auth(request)
        if denied is not None:
            return denied
        if not is_json_content_type(request.headers.get("content-type")):
            return error_response(415, f"the body must be sent as {JSON_MEDIA_TYPE}", "invalid_request_error", None,
                                  "unsupported_media_type")
        try:
            raw = json.loads(await read_body(request, MAX_LORA_BODY))
        except BodyTooLarge as e:
            return error_response(413, str(e), "invalid_request_error", None, "body_too_large")
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            return error_response(400, f"the body is not valid JSON: {e}", "invalid_request_error", None,
                                  "invalid_json")
        if not isinstance(raw, dict) or not set(raw) <= {"name", "path"}:
            return error_response(400, "the body must be a JSON object {\"name\": str, \"path\": str}",
                                  "invalid_request_error", None, "invalid_request")
        try:
            entry = await asyncio.to_thread(registry(request).add, raw.get("name"), raw.get("path"))
        except LoraForbidden as e:
            return error_response(403, str(e), "invalid_request_error", "path", "forbidden_path")
        except ValueError as e:  # the name, or a file that does not fit (stages.lora_files.LoraError)
            param = getattr(e, "param", None) or "path"
            return error_response(400, str(e), "invalid_request_error", param, "invalid_lora")
        return JSONResponse({"object": "lora", **entry.as_json()})

    @app.get("/v1/loras")
    async def list_loras(request: Request) -> Response:
        """The registered adapters (each denoiser rank keeps at most ``[lora] max_loaded`` of them in memory)."""
        denied = auth(request)
        if denied is not None:
            return denied
        return JSONResponse({"object": "list", "data": [e.as_json() for e in registry(request).list()]})

    @app.delete("/v1/loras/{name}")
    async def delete_lora(name: str, request: Request) -> Response:
        """Unregister an adapter: new requests naming it get a 400; the ranks evict it as it goes unused."""
        denied = auth(request)
        if denied is not None:
            return denied
        if not registry(request).remove(name):
            return error_response(404, f"no adapter named {name!r} is registered", "invalid_request_error", "name",
                                  "not_found")
        return JSONResponse({"object": "lora", "name": name, "deleted": True})
