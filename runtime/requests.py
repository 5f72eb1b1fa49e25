"""One image-generation request, validated once at the API edge: the fields of the OpenAI images API plus ours.

:data:`FIELDS` is the one table of limits. The same table drives the validation of the HTTP body, the CLI flags,
each line of a ``batch`` JSONL file and :meth:`Omni.generate`, and :func:`openapi_request_schema` generates the
HTTP schema from it, so the documented bounds and the checked bounds cannot drift. A bad value raises
:class:`RequestError` naming the field (``param``), the value and what is allowed; HTTP maps it to a 400 with an
OpenAI-style error body. The stages behind the edge trust a :class:`GenerationRequest` (they may assert).

Seeds: a request without ``seed`` gets a random one. Image ``i`` of a request with ``n`` images uses
``seed + i``, so one request with ``n = 2, seed = 7`` gives the same images as two requests with seeds 7 and 8.
The largest request seed is ``MAX_SEED - (MAX_N - 1)``, so every image seed stays below ``2**63``.

Work caps (``[server] max_pixels_steps``, ``[stages.denoiser|vae] max_batch_pixels``) depend on the config, not
on the request alone: :class:`WorkCaps` carries them and :func:`check_work` applies them.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from omni_runtime.stages.cache_config import CacheConfig, allowed_text, parse_cache

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 4000
MIN_SIDE = 16
MAX_SIDE = 2048
SIDE_MULTIPLE = 16
MAX_N = 10
MAX_STEPS = 200
MAX_GUIDANCE = 100.0
MAX_IMAGE_SEED = 2**63 - 1  # the seed of one image (the denoiser's torch.Generator takes up to 2**63 - 1)
MAX_SEED = MAX_IMAGE_SEED - (MAX_N - 1)  # the seed of a request: seed + n - 1 never passes MAX_IMAGE_SEED
OUTPUT_FORMATS = ("png", "jpeg", "webp")
RESPONSE_FORMATS = ("b64_json",)
DEFAULT_SIZE = "256x256"
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
MIN_PRIORITY, MAX_PRIORITY = -10, 10  # the priority extension field; higher is admitted first
MAX_LORAS = 8  # adapters in one request's lora list
MAX_LORA_SCALE = 100.0  # |scale| of one adapter (diffusers' set_adapters weight)
LORA_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # an adapter's registered name
_LORA_NAME = re.compile(LORA_NAME_PATTERN)
_SHOW_CHARS = 80

_SIDES = "|".join(str(v) for v in range(MAX_SIDE, MIN_SIDE - 1, -SIDE_MULTIPLE))
# Exactly the accepted sizes (used by the validation and written into the OpenAPI schema).
SIZE_PATTERN = f"^ *({_SIDES}) *[xX] *({_SIDES}) *$"
_SIZE = re.compile(SIZE_PATTERN)
# "non-empty": at least one character that is not ASCII white space (the same in Python's and ECMA's regex).
NON_BLANK_PATTERN = "[^ \\t\\n\\r\\f\\v]"
_NON_BLANK = re.compile(NON_BLANK_PATTERN)
_SIZE_LOOSE = re.compile(r"^ *(\d{1,6}) *[xX] *(\d{1,6}) *$")


def show(value: Any) -> str:
    """``repr(value)`` cut to 80 characters: an error message never echoes a megabyte the client sent."""
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else f"{text[:_SHOW_CHARS]}... ({len(text)} characters)"


class RequestError(ValueError):
    """A request field a user got wrong; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class LoraRef(msgspec.Struct, frozen=True, kw_only=True):
    """One adapter of a request: its registered ``name`` and weight ``scale``. ``path`` and ``version`` are
    filled by the orchestrator from its registry (``runtime.lora_registry``): what every denoiser rank loads."""

    name: str
    scale: float = 1.0
    path: str = ""
    version: int = 0


class GenerationRequest(msgspec.Struct, kw_only=True, frozen=True):
    prompt: str
    negative_prompt: str | None = None
    n: int = 1
    width: int = 256
    height: int = 256
    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    true_cfg_scale: float = 1.0
    seed: int = 0
    output_format: str = "png"
    priority: int = 0  # extension: admission order of the denoiser's step-level scheduling (aged while waiting)
    lora: tuple[LoraRef, ...] = ()  # extension: per-request LoRA adapters, combined as diffusers' set_adapters
    cache: CacheConfig | None = None  # extension: cache acceleration (stages.block_cache); None: the config's
    num_frames: int = 1  # a video model's frames (runtime.video_request); 1: an image
    #: two-expert (Wan 2.2) video models: the true-CFG scale of transformer_2's steps (the video edge's
    #: guidance_scale_2; ``stages.experts``); None: true_cfg_scale
    true_cfg_scale_2: float | None = None
    #: image edits: the input image files (checked at the edge: ``runtime.edit_requests``); only the VAE's encode
    #: hop receives them, the other hops get the request without (``without_images``)
    images: tuple[bytes, ...] = ()
    #: streamed answers (``runtime.stream_api``): previews per image the denoiser makes (0: none)
    partial_images: int = 0

    @property
    def is_edit(self) -> bool:
        return bool(self.images)

    def without_images(self) -> GenerationRequest:
        """This request with its input image files dropped (what the hops after the encode carry)."""
        return msgspec.structs.replace(self, images=()) if self.images else self

    def seeds(self) -> list[int]:
        """The seed of each of the ``n`` images: ``seed, seed + 1, ...``."""
        return [self.seed + i for i in range(self.n)]

    @property
    def pixels(self) -> int:
        """``n x width x height x num_frames``: what this request puts into a denoiser or VAE batch."""
        return self.n * self.width * self.height * self.num_frames

    @property
    def pixels_steps(self) -> int:
        """``n x width x height x num_inference_steps``: the denoiser work of this request."""
        return self.pixels * self.num_inference_steps


def lora_flag(text: str) -> dict[str, Any]:
    """The CLI's ``--lora NAME[:SCALE]`` (repeatable) -> one item of the ``lora`` field (checked by
    :func:`parse_lora`)."""
    name, sep, scale = text.rpartition(":") if ":" in text else (text, "", "")
    if not sep:
        return {"name": text}
    try:
        return {"name": name, "scale": float(scale)}
    except ValueError:
        raise RequestError(f"--lora {show(text)}: must be NAME or NAME:SCALE with a number SCALE", "lora") from None


def cache_flag(text: str) -> dict[str, Any]:
    """The CLI's ``--cache``: a JSON object, or ``METHOD[:THRESHOLD]`` (e.g. ``first_block:0.1``); checked by
    :func:`parse_cache_field`."""
    import json

    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError as e:
            raise RequestError(f"--cache {show(text)}: not a JSON object ({e})", "cache") from None
    method, sep, threshold = text.partition(":")
    if not sep:
        return {"method": method}
    try:
        return {"method": method, "threshold": float(threshold)}
    except ValueError:
        raise RequestError(f"--cache {show(text)}: must be METHOD, METHOD:THRESHOLD with a number THRESHOLD, or "
                           f"a JSON object {allowed_text()}", "cache") from None


def parse_cache_field(value: Any, param: str = "cache") -> CacheConfig:
    """The ``cache`` field (``stages.cache_config.parse_cache``), errors as :class:`RequestError` naming it."""
    try:
        return parse_cache(value, param)
    except ValueError as e:
        raise RequestError(f"{e}; allowed: {allowed_text()}", param) from None


# --- the one table of limits ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One request field: its JSON type, default, bounds, and (if any) the CLI flag that sets it."""

    name: str
    kind: str  # "string", "integer", "number", "size", "enum", "ignored", "lora", "cache"
    description: str
    default: Any = None
    minimum: Any = None  # int for integer fields, float for numbers
    maximum: Any = None
    max_chars: int | None = None
    non_empty: bool = False
    choices: tuple[str, ...] = ()
    required: bool = False
    cli_flag: str | None = None
    cli_type: Callable[[str], Any] | None = None

    def allowed(self) -> str:
        """What is allowed, in words (CLI help, docs)."""
        if self.kind == "integer":
            return f"an integer from {self.minimum} to {self.maximum}"
        if self.kind == "number":
            return f"a number from {self.minimum:g} to {self.maximum:g}"
        if self.kind == "size":
            return f"'WxH', each side a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}"
        if self.kind == "enum":
            return "one of " + ", ".join(self.choices)
        if self.kind == "lora":
            return (f"a list of at most {MAX_LORAS} {{\"name\": registered adapter, \"scale\": number from "
                    f"{-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}}} objects (a name given twice adds its scales)")
        if self.kind == "cache":
            return f"an object {allowed_text()}"
        if self.max_chars is not None:
            return f"a {'non-empty ' if self.non_empty else ''}string of at most {self.max_chars} characters"
        return "a string"


FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("prompt", "string", "what to draw", required=True, max_chars=MAX_PROMPT_CHARS, non_empty=True,
          cli_flag="--prompt"),
    Field("negative_prompt", "string", "used only with true_cfg_scale > 1", max_chars=MAX_PROMPT_CHARS,
          cli_flag="--negative-prompt"),
    Field("n", "integer", "number of images; image i uses seed + i", default=1, minimum=1, maximum=MAX_N),
    Field("size", "size", "'WIDTHxHEIGHT'", default=DEFAULT_SIZE, cli_flag="--size"),
    Field("response_format", "enum", "this server keeps no image store to serve 'url'",
          default="b64_json", choices=RESPONSE_FORMATS),
    Field("user", "string", "accepted, not used", max_chars=MAX_PROMPT_CHARS),
    Field("num_inference_steps", "integer", "denoising steps", default=DEFAULT_STEPS, minimum=1,
          maximum=MAX_STEPS, cli_flag="--steps", cli_type=int),
    Field("guidance_scale", "number", "the embedded guidance of Flux-dev-style models", default=DEFAULT_GUIDANCE,
          minimum=0.0, maximum=MAX_GUIDANCE, cli_flag="--guidance", cli_type=float),
    Field("true_cfg_scale", "number", "true classifier-free guidance runs when > 1 and negative_prompt is given",
          default=1.0, minimum=1.0, maximum=MAX_GUIDANCE, cli_flag="--true-cfg-scale", cli_type=float),
    Field("seed", "integer", "random when absent; image i uses seed + i", minimum=0, maximum=MAX_SEED,
          cli_flag="--seed", cli_type=int),
    Field("output_format", "enum", "the encoding of the images", default="png", choices=OUTPUT_FORMATS),
    Field("priority", "integer", "extension: higher is admitted to the denoiser first; a waiting request's "
          "priority rises by 1 every [stages.denoiser] priority_aging_s seconds, so none starves",
          default=0, minimum=MIN_PRIORITY, maximum=MAX_PRIORITY, cli_flag="--priority", cli_type=int),
    Field("lora", "lora", "extension: LoRA adapters registered with the server ([lora] adapters, POST /v1/loras) "
          "and their weights, combined as diffusers' set_adapters(names, weights); each row of the denoiser's "
          "running batch has its own", cli_flag="--lora", cli_type=lora_flag),
    Field("cache", "cache", "extension: cache acceleration of the denoiser for this request (absent: the config's "
          "[stages.denoiser.cache]; method 'none': off): 'first_block' is diffusers' First-Block Cache "
          "(FirstBlockCacheConfig(threshold)), 'dbcache' its Fn/Bn block layout with warm-up and a cap on "
          "consecutive cached steps", cli_flag="--cache", cli_type=cache_flag),
    Field("model", "ignored", "accepted, not used (OpenAI clients send it)"),
    Field("quality", "ignored", "accepted, not used"),
    Field("style", "ignored", "accepted, not used"),
)}


def parse_size(value: Any, param: str = "size") -> tuple[int, int]:
    """``"WxH"`` -> ``(width, height)``; both multiples of 16 between 16 and 2048 (:data:`SIZE_PATTERN`)."""
    if not isinstance(value, str):
        raise RequestError(f"{param}={show(value)}: must be a string 'WIDTHxHEIGHT', e.g. '256x256'", param)
    m = _SIZE.fullmatch(value)  # not .match: "$" would also match before a trailing newline
    if m is not None:
        return int(m.group(1)), int(m.group(2))
    loose = _SIZE_LOOSE.fullmatch(value)
    if loose is None:
        raise RequestError(f"{param}={show(value)}: must be 'WIDTHxHEIGHT', e.g. '256x256'", param)
    for side, text in (("width", loose.group(1)), ("height", loose.group(2))):
        if not re.fullmatch(f"({_SIDES})", text):
            raise RequestError(f"{param}={show(value)}: {side} {text} must be a multiple of {SIDE_MULTIPLE} "
                               f"between {MIN_SIDE} and {MAX_SIDE} (no leading zeros)", param)
    raise RequestError(f"{param}={show(value)}: must be 'WIDTHxHEIGHT', e.g. '256x256'", param)  # pragma: no cover


def parse_lora(value: Any, param: str = "lora") -> tuple[LoraRef, ...]:
    """The ``lora`` field: a list of ``{"name", "scale"}`` objects (scale defaults to 1); a name given twice adds
    its scales (JSON Schema cannot say "unique by name", and the sum is what applying it twice computes)."""
    if not isinstance(value, list) or len(value) > MAX_LORAS:
        raise RequestError(f"{param}={show(value)}: must be a list of at most {MAX_LORAS} objects "
                           f"{{\"name\": str, \"scale\": number}}", param)
    out: list[LoraRef] = []
    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(item, dict) or not set(item) <= {"name", "scale"}:
            raise RequestError(f"{where}={show(item)}: must be an object with keys 'name' (required) and 'scale'",
                               param)
        name, scale = item.get("name"), item.get("scale", 1.0)
        if not isinstance(name, str) or not _LORA_NAME.match(name):
            raise RequestError(f"{where}.name={show(name)}: must be an adapter name of 1 to 64 characters of "
                               f"A-Z, a-z, 0-9, '.', '_', '-' (not starting with '.', '_', '-')", param)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not -MAX_LORA_SCALE <= scale \
                <= MAX_LORA_SCALE:
            raise RequestError(f"{where}.scale={show(scale)}: must be a number from {-MAX_LORA_SCALE:g} to "
                               f"{MAX_LORA_SCALE:g}", param)
        out.append(LoraRef(name=name, scale=float(scale)))
    return tuple(out)


def _check_field(f: Field, v: Any) -> Any:
    """``v`` (not None) checked against ``f``; returns the value to use."""
    key = f.name
    if f.kind == "integer":
        if isinstance(v, float) and v.is_integer():  # JSON (and its schema) has numbers: 176.0 is the integer 176
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise RequestError(f"{key}={show(v)}: must be an integer between {f.minimum} and {f.maximum}", key)
        if not f.minimum <= v <= f.maximum:  # type: ignore[operator]
            raise RequestError(f"{key}={show(v)}: must be between {f.minimum} and {f.maximum}", key)
        return v
    if f.kind == "number":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise RequestError(f"{key}={show(v)}: must be a number between {f.minimum:g} and {f.maximum:g}", key)
        if not f.minimum <= v <= f.maximum:  # type: ignore[operator]
            raise RequestError(f"{key}={show(v)}: must be between {f.minimum:g} and {f.maximum:g}", key)
        return float(v)
    if f.kind == "size":
        return parse_size(v, key)
    if f.kind == "lora":
        return parse_lora(v, key)
    if f.kind == "cache":
        return parse_cache_field(v, key)
    if f.kind == "enum":
        if not isinstance(v, str) or v not in f.choices:
            if len(f.choices) == 1:
                raise RequestError(f"{key}={show(v)}: only {f.choices[0]!r} is supported ({f.description})", key)
            raise RequestError(f"{key}={show(v)}: allowed values are {', '.join(f.choices)}", key)
        return v
    if not isinstance(v, str):  # string and ignored
        raise RequestError(f"{key}={show(v)}: must be a string", key)
    if f.max_chars is not None and len(v) > f.max_chars:
        raise RequestError(f"{key} has {len(v)} characters: at most {f.max_chars} are allowed", key)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone UTF-16 surrogate ("\ud800") decodes from JSON but is no text
        raise RequestError(f"{key}: character {e.start} is a lone UTF-16 surrogate "
                           f"({show(v[e.start:e.end])}); allowed: valid Unicode text", key) from None
    if f.non_empty and not _NON_BLANK.search(v):
        raise RequestError(f"{key} is empty: a non-empty string is required", key)
    return v


@dataclass(frozen=True)
class WorkCaps:
    """The config's caps on the work of one request (0 = no cap)."""

    max_pixels_steps: int = 0  # [server] max_pixels_steps: n x W x H x steps
    max_batch_pixels: int = 0  # the smallest [stages.denoiser|vae] max_batch_pixels: n x W x H

    @classmethod
    def from_config(cls, cfg: Any) -> WorkCaps:
        """The caps of a :class:`~omni_runtime.runtime.config.RuntimeConfig`."""
        batch = [b for b in (cfg.stages.denoiser.max_batch_pixels, cfg.stages.vae.max_batch_pixels) if b > 0]
        return cls(max_pixels_steps=cfg.server.max_pixels_steps, max_batch_pixels=min(batch, default=0))


def check_work(req: GenerationRequest, caps: WorkCaps) -> None:
    """Raise :class:`RequestError` naming the fields and the cap when ``req`` is more work than ``caps`` allow."""
    if caps.max_batch_pixels and req.pixels > caps.max_batch_pixels:
        raise RequestError(f"n x width x height = {req.n} x {req.width} x {req.height} = {req.pixels} pixels: "
                           f"at most {caps.max_batch_pixels} are allowed (max_batch_pixels of the config); "
                           f"ask for fewer or smaller images", "size")
    if caps.max_pixels_steps and req.pixels_steps > caps.max_pixels_steps:
        raise RequestError(f"n x width x height x num_inference_steps = {req.n} x {req.width} x {req.height} x "
                           f"{req.num_inference_steps} = {req.pixels_steps}: at most {caps.max_pixels_steps} "
                           f"is allowed ([server] max_pixels_steps)", "num_inference_steps")


def check_fields(raw: dict[str, Any], table: Mapping[str, Field], *, allow_unknown: bool,
                 defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every field of ``table`` checked (its default when absent or None: ``defaults``' value where it has one,
    else the table's); an unknown key is refused naming the allowed ones unless ``allow_unknown``."""
    if not allow_unknown:
        unknown = sorted(k for k in raw if k not in table)
        if unknown:
            raise RequestError(f"{unknown[0]}: unknown field; allowed: {', '.join(sorted(table))}", unknown[0])
    got: dict[str, Any] = {}
    for name, f in table.items():
        v = raw.get(name)
        if v is None:
            if f.required:
                raise RequestError(f"{name} is required: {f.allowed()}", name)
            got[name] = defaults[name] if defaults and name in defaults else f.default
        else:
            got[name] = _check_field(f, v)
    return got


def parse_request(raw: Any, *, allow_unknown: bool = True, caps: WorkCaps | None = None,
                  defaults: Mapping[str, Any] | None = None) -> GenerationRequest:
    """Validate a JSON object (HTTP body, JSONL line, CLI flags, ``Omni.generate`` fields) against :data:`FIELDS`
    into a :class:`GenerationRequest`; with ``caps``, also :func:`check_work`. ``None`` means "absent".
    ``defaults``: the served family's defaults of absent fields (``ModelFamily.request_defaults``: its diffusers
    pipeline's own), where they differ from :data:`FIELDS`'."""
    if not isinstance(raw, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(raw).__name__}", None)
    got = check_fields(raw, FIELDS, allow_unknown=allow_unknown, defaults=defaults)
    width, height = got["size"] if isinstance(got["size"], tuple) else parse_size(got["size"])
    seed = got["seed"] if got["seed"] is not None else random.randrange(0, 2**31)
    req = GenerationRequest(
        prompt=got["prompt"], negative_prompt=got["negative_prompt"], n=got["n"], width=width, height=height,
        num_inference_steps=got["num_inference_steps"], guidance_scale=float(got["guidance_scale"]),
        true_cfg_scale=float(got["true_cfg_scale"]), seed=seed, output_format=got["output_format"],
        priority=got["priority"], lora=got["lora"] or (), cache=got["cache"])
    if caps is not None:
        check_work(req, caps)
    return req


# --- the OpenAPI schema, generated from the table -------------------------------------------------------------


def cache_schema(description: str) -> dict[str, Any]:
    """The schema of the ``cache`` field: one object per method with exactly its keys and bounds, or null."""
    from omni_runtime.stages.cache_config import CACHE_FIELDS

    variants: list[dict[str, Any]] = []
    for method, keys in CACHE_FIELDS.items():
        props: dict[str, Any] = {"method": {"type": "string", "enum": [method]}}
        for k, b in keys.items():
            if b is not None:
                props[k] = {"type": "integer" if isinstance(b[0], int) else "number", "minimum": b[0],
                            "maximum": b[1]}
        variants.append({"type": "object", "required": ["method"], "additionalProperties": False,
                         "properties": props})
    return {"description": description, "oneOf": [*variants, {"type": "null"}]}


def openapi_request_schema(defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON schema of the request body, generated from :data:`FIELDS` (OpenAPI 3.1: ``null`` = absent);
    ``defaults``: the served family's defaults (as :func:`parse_request` takes them)."""
    props: dict[str, Any] = {}
    for f in FIELDS.values():
        s: dict[str, Any] = {"description": f.description}
        if f.kind == "lora":
            s["type"], s["maxItems"] = "array", MAX_LORAS
            s["items"] = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
                "name": {"type": "string", "pattern": LORA_NAME_PATTERN},
                "scale": {"type": "number", "minimum": -MAX_LORA_SCALE, "maximum": MAX_LORA_SCALE,
                          "default": 1.0}}}
        elif f.kind == "cache":
            props[f.name] = cache_schema(f.description)
            continue
        elif f.kind in ("string", "ignored", "size", "enum"):
            s["type"] = "string"
        else:
            s["type"] = f.kind
        if f.kind in ("integer", "number"):
            s["minimum"], s["maximum"] = f.minimum, f.maximum
        if f.max_chars is not None:
            s["maxLength"] = f.max_chars
        if f.non_empty:
            s["minLength"], s["pattern"] = 1, NON_BLANK_PATTERN
        if f.kind == "size":
            s["pattern"], s["example"] = SIZE_PATTERN, DEFAULT_SIZE
        if f.kind == "enum":
            s["enum"] = list(f.choices)
        default = defaults[f.name] if defaults and f.name in defaults else f.default
        if default is not None:
            s["default"] = default
        if not f.required:  # an explicit null means "absent"
            s["type"] = [s["type"], "null"]
            if "enum" in s:
                s["enum"] = [*s["enum"], None]
        props[f.name] = s
    return {"type": "object", "required": [f.name for f in FIELDS.values() if f.required], "properties": props,
            "additionalProperties": True,
            "description": "Fields not listed are accepted and ignored. The config also caps the work of one "
                           "request (n x W x H x steps, n x W x H): beyond it the answer is 400."}
