"""An image-edit request, validated once at the edge into the one request type (``requests.GenerationRequest`` with
``images``): the form fields of ``POST /v1/images/edits``, ``omni-runtime generate --image``, ``Omni.edit`` and a
``batch`` line with ``image``.

The fields are the generation fields (``requests.FIELDS``, the same bounds; form fields arrive as text and are
converted first) with ``size`` also taking ``auto`` (the default of an edit): the first input image's size, each side rounded down to the
model's multiple (16 for FLUX.1-Kontext) and kept within 16..2048. Each input image must be a file PIL reads
(PNG, JPEG, WebP, ...), at most ``[server] max_edit_image_bytes`` bytes and ``max_edit_image_pixels`` pixels; a
request has 1 to ``min(max_edit_images, what the model takes)`` images. A ``mask`` must be an image of the first
input image's size, and is refused by a model without inpainting (every family served today).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni_runtime.runtime.requests import (
    FIELDS,
    MAX_SIDE,
    MIN_SIDE,
    SIDE_MULTIPLE,
    GenerationRequest,
    RequestError,
    WorkCaps,
    parse_request,
    show,
)
from omni_runtime.runtime.served_model import ServedModel, check_served, defaults_of, served_model_of

logger = logging.getLogger(__name__)

__all__ = ["AUTO_SIZE", "EditRules", "edit_rules", "image_size", "parse_edit_request", "read_image_file",
           "split_edit_fields"]

AUTO_SIZE = "auto"
#: form fields that are files, not text
FILE_FIELDS = ("image", "image[]", "mask")


@dataclass(frozen=True)
class EditRules:
    """What the config and the model allow an edit request: the config's caps and the family's declarations."""

    model: str                 # the pipeline class, for messages
    family_images: int         # input images the model takes (0: it does not edit)
    inpainting: bool           # it takes a mask
    multiple: int = 16         # image sides are multiples of this (2 x the VAE's scale factor)
    max_images: int = 4        # [server] max_edit_images
    max_image_bytes: int = 16 << 20
    max_image_pixels: int = 4096 * 4096
    #: the family's ``size = auto`` rule: the input images' (width, height) -> the output's, before rounding (None:
    #: the first image's size)
    output_size: Callable[[Sequence[tuple[int, int]]], tuple[int, int]] | None = None
    #: what the edge knows of the served model and layout (``runtime.served_model``): the family's defaults of absent
    #: fields, and what the family or the layout cannot run (e.g. TeaCache on Qwen-Image-Edit, or under HSDP)
    served: ServedModel | None = None

    @classmethod
    def from_config(cls, cfg: Any, family: Any, vae_scale_factor: int) -> EditRules:
        s = cfg.server
        return cls(model=family.pipeline_classes[0], family_images=family.image_inputs,
                   inpainting=family.inpainting, multiple=2 * vae_scale_factor, max_images=s.max_edit_images,
                   max_image_bytes=s.max_edit_image_bytes, max_image_pixels=s.max_edit_image_pixels,
                   output_size=family.edit_output_size, served=served_model_of(cfg))

    @property
    def images_allowed(self) -> int:
        return min(self.max_images, self.family_images)


def edit_rules(cfg: Any) -> EditRules:
    """The edit rules of the configured model (its family's declarations and the config's caps); an embedded tiny
    model is created first if it is missing."""
    from omni_runtime.runtime.model_store import ensure_model
    from omni_runtime.stages.denoiser import vae_scale_factor_of
    from omni_runtime.stages.models.family import family_of

    path = ensure_model(cfg.model.path)
    family = family_of(path)
    return EditRules.from_config(cfg, family, vae_scale_factor_of(path, family))


def read_image_file(path: str | Path, param: str = "image") -> bytes:
    """The bytes of an input image file (CLI ``--image``, a batch line's ``image``); a :class:`RequestError` naming
    ``param`` when it cannot be read (what is in it is checked by :func:`parse_edit_request`)."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise RequestError(f"{param}={str(path)!r}: cannot read it ({e.strerror or e}); allowed: a readable image "
                           f"file", param) from None


def split_edit_fields(raw: Mapping[str, Any], base: Path, param: str = "image") -> tuple[dict[str, Any], list[bytes]]:
    """A JSON request with ``image`` (a path or a list of paths, relative to ``base``) -> (the other fields, the
    image files' bytes); no ``image``: the fields and ``[]``."""
    fields = {k: v for k, v in raw.items() if k != param}
    value = raw.get(param)
    if value is None:
        return fields, []
    paths = value if isinstance(value, list) else [value]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise RequestError(f"{param}={show(value)}: must be an image file path or a list of them", param)
    return fields, [read_image_file(base / p, param) for p in paths]


def image_size(data: bytes, param: str, rules: EditRules) -> tuple[int, int]:
    """(width, height) of an image file, fully decoded once to prove it is one; a :class:`RequestError` naming
    ``param`` for bytes that are not an image, or an image past the caps."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > rules.max_image_bytes:
        raise RequestError(f"{param}: {len(data)} bytes; allowed: at most {rules.max_image_bytes} "
                           f"([server] max_edit_image_bytes)", param)
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size  # from the header: the pixel cap is checked before anything is decoded
            if w < rules.multiple or h < rules.multiple:
                raise RequestError(f"{param}: {w}x{h}; allowed: both sides at least {rules.multiple} pixels", param)
            if w * h > rules.max_image_pixels:
                raise RequestError(f"{param}: {w}x{h} = {w * h} pixels; allowed: at most {rules.max_image_pixels} "
                                   f"([server] max_edit_image_pixels)", param)
            img.load()
    except RequestError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise RequestError(f"{param}: not an image file this server reads (PNG, JPEG, WebP, ...): {e}",
                           param) from None
    return w, h


def _form_value(name: str, text: Any) -> Any:
    """A form field's text as the field's JSON type (integers and numbers are parsed, the ``lora`` list and the
    ``cache`` object read as JSON text; the rest stays text)."""
    f = FIELDS.get(name)
    if f is None or not isinstance(text, str):
        return text
    if f.kind in ("lora", "cache"):  # JSON text, as the video form takes it; text that is no JSON stays text and
        try:  # fails the field's check, naming it
            return json.loads(text)
        except ValueError:
            return text
    if f.kind == "integer":
        try:
            return int(text.strip())
        except ValueError:
            raise RequestError(f"{name}={show(text)}: must be an integer between {f.minimum} and {f.maximum}",
                               name) from None
    if f.kind == "number":
        try:
            return float(text.strip())
        except ValueError:
            raise RequestError(f"{name}={show(text)}: must be a number between {f.minimum:g} and {f.maximum:g}",
                               name) from None
    return text


def _auto_size(width: int, height: int, rules: EditRules) -> str:
    multiple = max(rules.multiple, SIDE_MULTIPLE)

    def side(v: int) -> int:
        return min(max(v // multiple * multiple, MIN_SIDE), MAX_SIDE // multiple * multiple)
    return f"{side(width)}x{side(height)}"


def parse_edit_request(fields: Mapping[str, Any], images: Sequence[bytes], rules: EditRules, *,
                       mask: bytes | None = None, caps: WorkCaps | None = None,
                       image_param: str = "image", allow_unknown: bool = True) -> GenerationRequest:
    """Validate an edit request: ``fields`` (form text or JSON values, ``None`` = absent), the input image files
    and an optional mask -> a :class:`GenerationRequest` with ``images``; :class:`RequestError` naming the field."""
    if rules.family_images < 1:
        raise RequestError(f"the model ({rules.model}) does not edit images; allowed: a model whose pipeline takes "
                           f"input images (FluxKontextPipeline), or POST /v1/images/generations", image_param)
    if not images:
        raise RequestError(f"{image_param} is required: 1 to {rules.images_allowed} input image file(s)", image_param)
    if len(images) > rules.images_allowed:
        why = ("[server] max_edit_images" if rules.max_images < rules.family_images
               else f"what {rules.model} takes")
        raise RequestError(f"{image_param}: {len(images)} images; allowed: at most {rules.images_allowed} ({why})",
                           image_param)
    sizes = [image_size(data, f"{image_param}[{i}]" if len(images) > 1 else image_param, rules)
             for i, data in enumerate(images)]
    if mask is not None:
        mask_size = image_size(mask, "mask", rules)
        if mask_size != sizes[0]:
            raise RequestError(f"mask: {mask_size[0]}x{mask_size[1]}; it must have the first image's size "
                               f"{sizes[0][0]}x{sizes[0][1]}", "mask")
        if not rules.inpainting:
            raise RequestError(f"mask: the model ({rules.model}) has no inpainting; allowed: no mask (the prompt "
                               f"says what to change)", "mask")
    raw = {k: _form_value(k, v) for k, v in fields.items() if k not in FILE_FIELDS}
    if raw.get("size") is None or (isinstance(raw["size"], str) and raw["size"].strip() == AUTO_SIZE):
        raw["size"] = _auto_size(*(rules.output_size(sizes) if rules.output_size else sizes[0]), rules)
    req = parse_request(raw, allow_unknown=allow_unknown, caps=caps, defaults=defaults_of(rules.served))
    req = GenerationRequest(**{**{f: getattr(req, f) for f in req.__struct_fields__}, "images": tuple(images)})
    check_served(req, rules.served)
    return req
