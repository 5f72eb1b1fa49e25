"""One image-generation request, validated: the fields of the OpenAI images API plus our extensions.

The same checks serve the HTTP body, the CLI flags and each line of a ``batch`` JSONL file. A bad value raises
:class:`RequestError` naming the field (``param``), the value and what is allowed; HTTP maps it to a 400 with an
OpenAI-style error body.

Seeds: a request without ``seed`` gets a random one. Image ``i`` of a request with ``n`` images uses
``seed + i``, so one request with ``n = 2, seed = 7`` gives the same images as two requests with seeds 7 and 8.
"""

from __future__ import annotations

import logging
import random
import re
from typing import Any

import msgspec

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 4000
MAX_SIDE = 2048
SIDE_MULTIPLE = 16
MAX_STEPS = 200
MAX_SEED = 2**63 - 1
OUTPUT_FORMATS = ("png", "jpeg", "webp")
DEFAULT_SIZE = "256x256"
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")
_SHOW_CHARS = 80


def show(value: Any) -> str:
    """``repr(value)`` cut to 80 characters: an error message never echoes a megabyte the client sent."""
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else f"{text[:_SHOW_CHARS]}... ({len(text)} characters)"


class RequestError(ValueError):
    """A request field a user got wrong; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


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

    def seeds(self) -> list[int]:
        """The seed of each of the ``n`` images: ``seed, seed + 1, ...``."""
        return [self.seed + i for i in range(self.n)]


_FIELDS = {"prompt", "negative_prompt", "n", "size", "response_format", "user", "num_inference_steps",
           "guidance_scale", "true_cfg_scale", "seed", "output_format", "model", "quality", "style"}


def parse_size(value: Any, param: str = "size") -> tuple[int, int]:
    """``"WxH"`` -> ``(width, height)``; both multiples of 16 between 16 and 2048."""
    if not isinstance(value, str):
        raise RequestError(f"{param}={show(value)}: must be a string 'WIDTHxHEIGHT', e.g. '256x256'", param)
    m = _SIZE.match(value)
    if m is None:
        raise RequestError(f"{param}={show(value)}: must be 'WIDTHxHEIGHT', e.g. '256x256'", param)
    w, h = int(m.group(1)), int(m.group(2))
    for side, v in (("width", w), ("height", h)):
        if not SIDE_MULTIPLE <= v <= MAX_SIDE or v % SIDE_MULTIPLE:
            raise RequestError(f"{param}={show(value)}: {side} {v} must be a multiple of {SIDE_MULTIPLE} "
                               f"between {SIDE_MULTIPLE} and {MAX_SIDE}", param)
    return w, h


def _int(raw: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    v = raw.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{key}={show(v)}: must be an integer between {low} and {high}", key)
    if not low <= v <= high:
        raise RequestError(f"{key}={show(v)}: must be between {low} and {high}", key)
    return v


def _float(raw: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    v = raw.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise RequestError(f"{key}={show(v)}: must be a number between {low:g} and {high:g}", key)
    if not low <= v <= high:
        raise RequestError(f"{key}={show(v)}: must be between {low:g} and {high:g}", key)
    return float(v)


def _str(raw: dict[str, Any], key: str, required: bool = False) -> str | None:
    v = raw.get(key)
    if v is None:
        if required:
            raise RequestError(f"{key} is required: a non-empty string", key)
        return None
    if not isinstance(v, str):
        raise RequestError(f"{key}={show(v)}: must be a string", key)
    if len(v) > MAX_PROMPT_CHARS:
        raise RequestError(f"{key} has {len(v)} characters: at most {MAX_PROMPT_CHARS} are allowed", key)
    return v


def parse_request(raw: Any, *, allow_unknown: bool = True) -> GenerationRequest:
    """Validate a JSON object (HTTP body or JSONL line) into a :class:`GenerationRequest`."""
    if not isinstance(raw, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(raw).__name__}", None)
    if not allow_unknown:
        unknown = sorted(set(raw) - _FIELDS)
        if unknown:
            raise RequestError(f"{unknown[0]}: unknown field; allowed: {', '.join(sorted(_FIELDS))}", unknown[0])
    prompt = _str(raw, "prompt", required=True)
    assert prompt is not None
    if not prompt.strip():
        raise RequestError("prompt is empty: a non-empty string is required", "prompt")
    rf = raw.get("response_format")
    if rf is not None and rf != "b64_json":
        raise RequestError(f"response_format={show(rf)}: only 'b64_json' is supported (this server keeps no "
                           f"image store to serve 'url')", "response_format")
    of = raw.get("output_format")
    if of is not None and of not in OUTPUT_FORMATS:
        raise RequestError(f"output_format={show(of)}: allowed values are {', '.join(OUTPUT_FORMATS)}",
                           "output_format")
    user = raw.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError(f"user={show(user)}: must be a string", "user")
    width, height = parse_size(raw["size"] if raw.get("size") is not None else DEFAULT_SIZE)
    seed = raw.get("seed")
    if seed is None:
        seed = random.randrange(0, 2**31)
    else:
        seed = _int(raw, "seed", 0, 0, MAX_SEED)
    n = _int(raw, "n", 1, 1, 10)
    if seed + n - 1 > MAX_SEED:
        raise RequestError(f"seed={seed}: seed + n - 1 must be at most {MAX_SEED}", "seed")
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=_str(raw, "negative_prompt"),
        n=n,
        width=width,
        height=height,
        num_inference_steps=_int(raw, "num_inference_steps", DEFAULT_STEPS, 1, MAX_STEPS),
        guidance_scale=_float(raw, "guidance_scale", DEFAULT_GUIDANCE, 0.0, 100.0),
        true_cfg_scale=_float(raw, "true_cfg_scale", 1.0, 1.0, 100.0),
        seed=seed,
        output_format=of or "png",
    )
