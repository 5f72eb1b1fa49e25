"""Encode (H, W, 3) uint8 arrays as PNG / JPEG / WebP bytes, and back."""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


PNG_COMPRESS_LEVEL = 1
"""zlib level of PNG responses: on a 256x256 photo-like image level 1 encodes in 5.5 ms against 18 ms at PIL's
default 6, for an 18 % larger file (noise-like images cost ~7 ms at any level); it is on every request's latency."""


def encode_image(array: np.ndarray, fmt: str = "png") -> bytes:
    """Encode one image; PNG is lossless (the same seed gives the same bytes), JPEG/WebP at quality 95. A video
    (frames, H, W, 3) becomes a zip of its lossless PNG frames (``runtime.video_files``)."""
    if array.ndim == 4:
        from omni_runtime.runtime.video_files import encode_frames

        return encode_frames(array)
    buf = io.BytesIO()
    kwargs = {"compress_level": PNG_COMPRESS_LEVEL} if fmt == "png" else {"quality": 95}
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format=_PIL_FORMATS[fmt], **kwargs)
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
