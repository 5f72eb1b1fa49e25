"""One text-to-video request, validated once at the edge (``POST /v1/videos``, ``generate --num-frames``,
``Omni.generate_video``, a ``batch`` line with ``num_frames`` or ``seconds``) into the runtime's
:class:`~runtime.requests.GenerationRequest`.

The fields are those of OpenAI's Videos API (``prompt``, ``size``, ``seconds``) plus the ones vLLM-Omni and SGLang
accept for Wan (``num_frames``, ``fps``, ``seed``, ``num_inference_steps``, ``guidance_scale``, ``guidance_scale_2``,
``negative_prompt``), and the image routes' ``cache`` (cache acceleration; in a multipart form a JSON object as
text). ``guidance_scale`` is the pipeline's classifier-free guidance: the request runs the
unconditional branch on ``negative_prompt`` (``""`` when absent, as ``WanPipeline``) when it is > 1, which the
denoiser computes as its true-CFG combine (``true_cfg_scale``); ``guidance_scale_2`` is that of the steps a
two-expert (Wan 2.2) model's ``transformer_2`` denoises (``true_cfg_scale_2``; default ``guidance_scale``, as
``WanPipeline``), refused for a one-expert model. ``seconds`` gives ``seconds x fps`` frames rounded
down to what the model's VAE takes (``4 k + 1`` for Wan); ``num_frames`` must be of that form itself.
Caps (``[video]``): ``max_frames`` and ``max_work`` (width x height x frames x steps); past them a 400 naming the cap.

Every edge calls :func:`parse_video`: the fields are checked once, first (a bad value is an error before an embedded
model is made), then the model's rules, the caps and what the served family and layout refuse
(``runtime.served_model``).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from omni_runtime.runtime.requests import (
    FIELDS,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    Field,
    GenerationRequest,
    RequestError,
    cache_schema,
    check_fields,
    parse_size,
    show,
)
from omni_runtime.runtime.served_model import check_served, served_model_of

logger = logging.getLogger(__name__)

DEFAULT_SIZE = "832x480"  # WanPipeline's default 480p (width x height)
DEFAULT_FRAMES = 81
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0
MAX_SECONDS = 60.0

VIDEO_FIELDS: dict[str, Field] = {f.name: f for f in (
    FIELDS["prompt"],
    Field("negative_prompt", "string", "the unconditional branch's prompt ('' when absent)",
          max_chars=MAX_PROMPT_CHARS),
    Field("size", "size", "'WIDTHxHEIGHT'", default=DEFAULT_SIZE),
    Field("seconds", "number", "length of the video; frames = seconds x fps rounded down to the model's 4 k + 1",
          minimum=0.0, maximum=MAX_SECONDS),
    Field("num_frames", "integer", f"frames of the video (4 k + 1 for Wan; default {DEFAULT_FRAMES}); give "
          "seconds or num_frames", minimum=1, maximum=100_000),
    Field("fps", "integer", "frames per second of the mp4 (default [video] fps)", minimum=1, maximum=240),
    Field("seed", "integer", "random when absent", minimum=0, maximum=MAX_SEED),
    Field("num_inference_steps", "integer", "denoising steps", default=DEFAULT_STEPS, minimum=1, maximum=MAX_STEPS),
    Field("guidance_scale", "number", "classifier-free guidance with negative_prompt when > 1",
          default=DEFAULT_GUIDANCE, minimum=0.0, maximum=MAX_GUIDANCE),
    Field("guidance_scale_2", "number", "the second expert's guidance of two-expert (Wan 2.2) models",
          minimum=0.0, maximum=MAX_GUIDANCE),
    FIELDS["cache"],
    Field("model", "ignored", "accepted, not used (OpenAI clients send it)"),
    Field("user", "ignored", "accepted, not used"),
)}


def video_request_schema() -> dict[str, Any]:
    """The JSON schema of a ``POST /v1/videos`` body, generated from :data:`VIDEO_FIELDS`."""
    types = {"integer": "integer", "number": "number"}
    props: dict[str, Any] = {}
    for f in VIDEO_FIELDS.values():
        s: dict[str, Any] = {"description": f"{f.description}; {f.allowed()}", "type": types.get(f.kind, "string")}
        if f.kind in types:
            s["minimum"], s["maximum"] = f.minimum, f.maximum
        if f.name == "seconds":  # OpenAI sends a string
            s["type"] = ["number", "string"]
        if f.default is not None:
            s["default"] = f.default
        props[f.name] = cache_schema(f.description) if f.kind == "cache" else s
    return {"type": "object", "required": ["prompt"], "properties": props, "additionalProperties": False}


@dataclass(frozen=True)
class VideoModel:
    """What the edge needs to know of the served model: its family, whether it makes videos, and its VAE's
    frames per latent frame."""

    family: str
    video: bool
    temporal_factor: int
    #: the checkpoint's transformers (``stages.experts``): 2 for Wan 2.2's two experts, which take guidance_scale_2
    experts: int = 1


@lru_cache(maxsize=8)
def video_model(path: str) -> VideoModel:
    """The :class:`VideoModel` of a model directory (read once)."""
    from omni_runtime.stages.denoiser import temporal_factor_of
    from omni_runtime.stages.models.family import family_of

    family = family_of(path)
    return VideoModel(family.name, family.video, temporal_factor_of(Path(path), family) if family.video else 1,
                      family.expert_schedule(Path(path)).experts)


@dataclass(frozen=True)
class VideoRequest:
    req: GenerationRequest
    fps: int
    seconds: str

    @property
    def size(self) -> str:
        return f"{self.req.width}x{self.req.height}"


def _coerce_form(raw: dict[str, Any]) -> dict[str, Any]:
    """Multipart fields arrive as strings: numbers of the numeric fields become numbers (bad ones stay strings
    and fail the check naming the field)."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        f = VIDEO_FIELDS.get(k)
        if isinstance(v, str) and f is not None and f.kind == "cache":  # a JSON object as text; bad text fails
            try:  # the check naming the field
                v = json.loads(v)
            except ValueError:
                pass
        elif isinstance(v, str) and f is not None and f.kind in ("integer", "number"):
            try:
                v = float(v) if f.kind == "number" or "." in v or "e" in v.lower() else int(v)
            except ValueError:
                pass
        out[k] = v
    return out


def check_video_fields(raw: dict[str, Any], form: bool = False) -> dict[str, Any]:
    """Every field of ``raw`` checked against :data:`VIDEO_FIELDS` (what needs no model); the checked values."""
    raw = _coerce_form(raw) if form else raw
    if isinstance(raw.get("seconds"), str):  # OpenAI's Videos API sends seconds as a string ("4", "8")
        raw = {**_coerce_form({"seconds": raw["seconds"]}), **{k: v for k, v in raw.items() if k != "seconds"}}
    return check_fields(raw, VIDEO_FIELDS, allow_unknown=False)


def parse_video(raw: Any, cfg: Any, form: bool = False) -> VideoRequest:
    """``raw`` (a ``POST /v1/videos`` body, ``generate``'s flags, an ``Omni.generate_video`` call, a ``batch``
    line) as the video request of ``cfg``'s model (read, or made if it is an embedded one that does not exist yet,
    once the fields passed), within ``[video]``'s caps and what the served family and layout run."""
    from omni_runtime.runtime.model_store import ensure_model

    v = cfg.video
    vr = parse_video_request(raw, lambda: video_model(str(ensure_model(cfg.model.path))), default_fps=v.fps,
                             max_frames=v.max_frames, max_work=v.max_work, form=form)
    check_served(vr.req, served_model_of(cfg))  # e.g. a cache method the family or the layout cannot run
    return vr


def parse_video_request(raw: Any, model: VideoModel | Callable[[], VideoModel], *, default_fps: int,
                        max_frames: int, max_work: int, form: bool = False) -> VideoRequest:
    """Validate a video request body against :data:`VIDEO_FIELDS` and the caps; unknown fields are refused (the
    image-to-video ``input_reference`` among them: not served). The fields are checked first; ``model`` may be a
    function that reads (or makes) the model, called only then."""
    if not isinstance(raw, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(raw).__name__}", None)
    got = check_video_fields(raw, form)
    if not isinstance(model, VideoModel):
        model = model()
    if not model.video:
        raise RequestError(f"the served model is a {model.family} model, which makes images; /v1/videos needs a "
                           f"video model (pipeline WanPipeline); use /v1/images/generations", "model")
    if got["guidance_scale_2"] is not None and model.experts < 2:
        raise RequestError("guidance_scale_2: only two-expert (Wan 2.2, boundary_ratio) models use it; this model "
                           "has one transformer; allowed: absent", "guidance_scale_2")
    tf = model.temporal_factor
    fps = got["fps"] or default_fps
    if got["seconds"] is not None and got["num_frames"] is not None:
        raise RequestError("seconds and num_frames are both given; allowed: one of them", "num_frames")
    if got["seconds"] is not None:
        frames = int(got["seconds"] * fps)
        if frames < 1:
            raise RequestError(f"seconds={show(raw['seconds'])} at {fps} fps is no frame; allowed: seconds >= "
                               f"{1 / fps:g}", "seconds")
        num_frames = (frames - 1) // tf * tf + 1
        seconds = f"{got['seconds']:g}"
    else:
        num_frames = got["num_frames"] or DEFAULT_FRAMES
        if (num_frames - 1) % tf:
            low = (num_frames - 1) // tf * tf + 1
            raise RequestError(f"num_frames={num_frames}: this model takes {tf} k + 1 frames; nearest: {low} or "
                               f"{low + tf}", "num_frames")
        seconds = f"{num_frames / fps:g}"
    if num_frames > max_frames:
        raise RequestError(f"num_frames={num_frames}: at most {max_frames} frames are allowed ([video] max_frames)",
                           "num_frames")
    width, height = got["size"] if isinstance(got["size"], tuple) else parse_size(got["size"])
    steps = got["num_inference_steps"]
    work = width * height * num_frames * steps
    if work > max_work:
        raise RequestError(f"width x height x num_frames x num_inference_steps = {width} x {height} x {num_frames} x "
                           f"{steps} = {work}: at most {max_work} is allowed ([video] max_work)", "size")
    seed = got["seed"] if got["seed"] is not None else random.randrange(0, 2**31)
    req = GenerationRequest(prompt=got["prompt"], negative_prompt=got["negative_prompt"] or "", width=width,
                            height=height, num_inference_steps=steps, true_cfg_scale=max(1.0, got["guidance_scale"]),
                            seed=seed, num_frames=num_frames, true_cfg_scale_2=got["guidance_scale_2"],
                            cache=got["cache"])
    return VideoRequest(req=req, fps=fps, seconds=seconds)
