"""``POST /v1/images/edits``: OpenAI's images edit as the official client sends it (``multipart/form-data``).

Parts: ``image`` (one file) or ``image[]`` (several), ``prompt``, optional ``mask``, ``n``, ``size`` (``WxH`` or
``auto``), ``response_format`` (``b64_json``), ``output_format``, and our extensions as text fields: ``seed``,
``num_inference_steps``, ``guidance_scale``, ``negative_prompt``, ``true_cfg_scale`` (every field of
``runtime.requests.FIELDS``; the ``cache`` object and the ``lora`` list as JSON text). The body is parsed streaming with caps
(``runtime.multipart_form``); the request is validated once (``runtime.edit_requests``) and runs like a generation,
with the VAE stage encoding the input image first (docs/ARCHITECTURE.md, "Image edits").
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from omni_runtime.runtime.edit_requests import AUTO_SIZE, EditRules, edit_rules, parse_edit_request
from omni_runtime.runtime.http_common import (
    IMAGES_ERRORS,
    IMAGES_SCHEMA,
    ApiContext,
    documented,
    invalid,
    run_images,
    serving_error,
)
from omni_runtime.runtime.multipart_form import FormError, FormLimits, boundary_of, read_form
from omni_runtime.runtime.requests import FIELDS, RequestError, openapi_request_schema, show
from omni_runtime.runtime.served_model import defaults_of, served_model_of
from omni_runtime.runtime.stream_api import (
    EDIT,
    parse_stream,
    stream_images,
    streamed_responses,
    with_stream_fields,
)

logger = logging.getLogger(__name__)

__all__ = ["ROUTE", "register"]

ROUTE = "/v1/images/edits"
FORM_MEDIA_TYPE = "multipart/form-data"
#: every generation field is a form field (the ``cache`` object and the ``lora`` list as JSON text: OpenAPI's
#: encoding of an object or array part of a form)
_FORM_FIELDS = tuple(FIELDS)

_ERRORS = {
    **IMAGES_ERRORS,
    400: "invalid_request: a field or a file is wrong (param names it): bytes that are not an image, too many "
         "images, a mask of another size, a mask for a model without inpainting, a model that does not edit, a "
         "malformed form",
    413: "body_too_large: an image file over [server] max_edit_image_bytes, a text field over 64 KiB, or the body "
         "over the sum of the caps",
    415: "unsupported_media_type: the body is not sent as Content-Type: multipart/form-data",
}


def _form_schema(cfg: Any) -> dict[str, Any]:
    """The OpenAPI schema of the form: the generation fields' bounds (``requests.FIELDS``) and the files."""
    s = cfg.server
    props = {k: v for k, v in openapi_request_schema(defaults_of(served_model_of(cfg)))["properties"].items()
             if k in _FORM_FIELDS}
    props["size"] = {**props["size"], "description": f"'WIDTHxHEIGHT' or '{AUTO_SIZE}' (the default: the first "
                                                     f"image's size rounded down to the model's multiple)",
                     "pattern": props["size"]["pattern"][:-1] + f"|^ *{AUTO_SIZE} *$", "default": AUTO_SIZE}
    file_ = {"type": "string", "format": "binary", "maxLength": s.max_edit_image_bytes,
             "description": f"an image file (PNG, JPEG, WebP, ...), at most {s.max_edit_image_bytes} bytes and "
                            f"{s.max_edit_image_pixels} pixels"}
    props["image"] = {**file_, "description": "the input image; " + file_["description"]}
    props["image[]"] = {"type": "array", "items": file_, "maxItems": s.max_edit_images,
                        "description": f"several input images (at most {s.max_edit_images}, and what the model "
                                       f"takes)"}
    props["mask"] = {**file_, "description": "refused (400) by a model without inpainting; it must have the first "
                                             "image's size"}
    return with_stream_fields({"type": "object", "required": ["prompt"], "properties": props})


def register(app: FastAPI, ctx: ApiContext) -> None:
    """Add the route to ``app``."""
    s = ctx.cfg.server
    limits = FormLimits(max_files=s.max_edit_images + 1, max_file_bytes=s.max_edit_image_bytes,
                        max_body_bytes=(s.max_edit_images + 1) * s.max_edit_image_bytes + (4 << 20))
    rules: list[EditRules] = []  # read from the model directory on the first request (it exists once serving)

    async def edits(request: Request) -> Response:
        boundary = boundary_of(request.headers.get("content-type"))
        if boundary is None:
            return invalid(f"Content-Type {show(request.headers.get('content-type'))}: the body must be sent as "
                           f"{FORM_MEDIA_TYPE} (with a boundary)", None, "unsupported_media_type", 415)
        try:
            form = await read_form(request.stream(), boundary, limits)
        except FormError as e:
            code = "body_too_large" if e.status == 413 else "invalid_request"
            return invalid(str(e), e.param, code, e.status, {"Connection": "close"} if e.status == 413 else None)
        except ClientDisconnect:
            return Response(status_code=499)
        names = {name for name, _ in form.files}
        if "image" in names and "image[]" in names:
            return ctx.bad_request("send the input images as 'image' or as 'image[]', not both", "image")
        unknown = names - {"image", "image[]", "mask"}
        if unknown:
            return ctx.bad_request(f"{sorted(unknown)[0]}: unknown file field; allowed: image, image[], mask",
                                   sorted(unknown)[0])
        masks = [data for name, data in form.files if name == "mask"]
        if len(masks) > 1:
            return ctx.bad_request("mask: at most one mask file", "mask")
        images = [data for name, data in form.files if name in ("image", "image[]")]
        if not rules:
            try:
                rules.append(edit_rules(ctx.cfg))
            except Exception as e:  # the model directory cannot be read: our problem, in the OpenAI error body
                return serving_error(e, ctx)
        try:
            req = parse_edit_request(form.fields, images, rules[0], mask=masks[0] if masks else None,
                                     caps=ctx.caps, image_param="image[]" if "image[]" in names else "image")
            partials = parse_stream(form.fields, form=True)
        except RequestError as e:
            return ctx.bad_request(str(e), e.param)
        if partials is not None:
            return await stream_images(request, ctx, req, partials, EDIT)
        return await run_images(request, ctx, req)

    app.add_api_route(ROUTE, ctx.counted(edits), methods=["POST"], name="edits", responses=streamed_responses(
        documented(_ERRORS, IMAGES_SCHEMA), EDIT), openapi_extra={"security": ctx.security, "requestBody": {
            "required": True, "content": {FORM_MEDIA_TYPE: {"schema": _form_schema(ctx.cfg)}}}})

    def patch(schema: dict[str, Any]) -> None:  # the table's exact bounds (FastAPI would hold them as floats)
        schema["paths"][ROUTE]["post"]["requestBody"]["content"][FORM_MEDIA_TYPE]["schema"] = _form_schema(ctx.cfg)

    ctx.openapi_patches.append(patch)
