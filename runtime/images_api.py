"""``POST /v1/images/generations``: OpenAI's images API, a JSON body validated by ``runtime.requests``.

Request mistakes are 400, a body over 1 MiB 413, a body not sent as ``application/json`` 415 (a cross-site form post
can send text/plain without a CORS preflight; JSON it cannot); the other answers are the images routes' shared ones
(``http_common.IMAGES_ERRORS``). The request schema in ``/openapi.json`` is generated from
``runtime.requests.FIELDS``, the table the validation uses.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from omni_runtime.runtime.http_common import (
    IMAGES_ERRORS,
    IMAGES_SCHEMA,
    JSON_MEDIA_TYPE,
    ApiContext,
    BodyTooLarge,
    documented,
    invalid,
    is_json_content_type,
    read_body,
    run_images,
)
from omni_runtime.runtime.requests import RequestError, openapi_request_schema, show
from omni_runtime.runtime.served_model import defaults_of, parse_served, served_model_of
from omni_runtime.runtime.stream_api import (
    GENERATION,
    parse_stream,
    stream_images,
    streamed_responses,
    with_stream_fields,
)

logger = logging.getLogger(__name__)

__all__ = ["ROUTE", "generations_responses", "register"]

ROUTE = "/v1/images/generations"

_ERRORS = {
    **IMAGES_ERRORS,
    400: "invalid_json / invalid_request: the body or a field is wrong (param names it), or the request is more "
         "work than the config's caps allow",
    413: "body_too_large: the body is over 1 MiB",
    415: "unsupported_media_type: the body is not sent as Content-Type: application/json",
}


def generations_responses() -> dict[int | str, dict[str, Any]]:
    """The documented responses of the generations route (OpenAPI)."""
    return streamed_responses(documented(_ERRORS, IMAGES_SCHEMA), GENERATION)


def _request_schema(defaults: dict[str, Any]) -> dict[str, Any]:
    return with_stream_fields(openapi_request_schema(defaults))


def register(app: FastAPI, ctx: ApiContext) -> None:
    """Add the route to ``app``."""

    async def generations(request: Request) -> Response:
        if not is_json_content_type(request.headers.get("content-type")):
            return invalid(f"Content-Type {show(request.headers.get('content-type'))}: the body must be sent as "
                           f"{JSON_MEDIA_TYPE}", None, "unsupported_media_type", 415)
        try:
            body = await read_body(request)
        except BodyTooLarge as e:
            return invalid(str(e), None, "body_too_large", 413, {"Connection": "close"})
        except ClientDisconnect:
            return Response(status_code=499)
        try:
            raw = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return invalid(f"the body is not valid JSON: {e}", None, "invalid_json")
        except RecursionError:  # e.g. 50,000 nested '[': the parser gives up; it is still the client's mistake
            return invalid("the body is not valid JSON: nested too deeply", None, "invalid_json")
        try:
            # the family's defaults of absent fields; what the model's family declares it cannot run is refused
            req = parse_served(raw, served_model_of(ctx.cfg), caps=ctx.caps)
            partials = parse_stream(raw)
        except RequestError as e:
            return ctx.bad_request(str(e), e.param)
        if partials is not None:
            return await stream_images(request, ctx, req, partials, GENERATION)
        return await run_images(request, ctx, req)

    defaults = defaults_of(served_model_of(ctx.cfg))  # the served family's, shown in the schema
    app.add_api_route(ROUTE, ctx.counted(generations), methods=["POST"], name="generations",
                      responses=generations_responses(), openapi_extra={
                          "security": ctx.security,
                          "requestBody": {"required": True,
                                          "content": {JSON_MEDIA_TYPE: {"schema": _request_schema(defaults)}}}})

    def patch(schema: dict[str, Any]) -> None:
        # FastAPI's OpenAPI model holds bounds as floats (2**63 - 10 would become 2**63): put the table's in
        body = schema["paths"][ROUTE]["post"]["requestBody"]["content"][JSON_MEDIA_TYPE]
        body["schema"] = _request_schema(defaults)

    ctx.openapi_patches.append(patch)
