"""Videos offline: ``omni-runtime generate --num-frames 33 -o out.mp4`` (or ``out.zip``: the lossless frames) and
the video lines of ``omni-runtime batch`` (a line with ``num_frames`` or ``seconds``; written as ``<line>.mp4``).
Both validate with ``runtime.video_request.parse_video`` (the one check of ``POST /v1/videos``, re-exported here)
and run the same engines."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omni_runtime.runtime.config import RuntimeConfig
from omni_runtime.runtime.requests import RequestError
from omni_runtime.runtime.video_request import VideoRequest, parse_video, video_model

logger = logging.getLogger(__name__)

__all__ = ["VIDEO_SUFFIXES", "is_video_output", "parse_video", "refuse_images", "video_bytes",
           "video_request_from_args"]

VIDEO_SUFFIXES = (".mp4", ".zip")  # the H.264 video; a zip of the frames as lossless PNGs


def video_request_from_args(args: argparse.Namespace, cfg: RuntimeConfig) -> VideoRequest:
    """The video request ``generate``'s flags describe, checked as a /v1/videos body."""
    names = ("prompt", "negative_prompt", "size", "seed", "num_inference_steps", "guidance_scale", "num_frames",
             "fps", "guidance_scale_2")
    return parse_video({k: getattr(args, k) for k in names if getattr(args, k, None) is not None}, cfg)


def is_video_output(args: argparse.Namespace) -> bool:
    """``generate`` makes a video when its output is .mp4 / .zip or ``--num-frames`` (or the video-only
    ``--guidance-scale-2``) is given."""
    return Path(args.output).suffix.lower() in VIDEO_SUFFIXES or getattr(args, "num_frames", None) is not None \
        or getattr(args, "guidance_scale_2", None) is not None


def refuse_images(cfg: RuntimeConfig, where: str) -> None:
    """An image request to a video model is a :class:`RequestError` saying how to ask for a video."""
    from omni_runtime.runtime.model_store import ensure_model

    model = video_model(str(ensure_model(cfg.model.path)))
    if model.video:
        raise RequestError(f"{where}: the model is a {model.family} video model; ask for a video (num_frames or "
                           f"seconds; generate -o out.mp4; Omni.generate_video)", "num_frames")


def video_bytes(frames_zip: bytes, suffix: str, fps: int) -> bytes:
    """What the VAE stage sent (the frames zip) as the file of ``suffix``."""
    if suffix == ".zip":
        return frames_zip
    from omni_runtime.runtime.video_files import decode_frames, encode_mp4

    return encode_mp4(decode_frames(frames_zip), fps)
