"""Images as the bytes a request carries or an answer returns: PNG file bytes of an array (or of seeded noise of a
size), and an answer's ``b64_json`` back to an array."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def png(image: np.ndarray | int, height: int | None = None, seed: int = 0) -> bytes:
    """PNG file bytes of an (H, W, 3) uint8 array, or, called ``png(width, height, seed=0)``, of that size filled with
    uniform noise from ``np.random.default_rng(seed)`` (an edit's input picture)."""
    if not isinstance(image, np.ndarray):
        assert height is not None, "png(width, height) or png(array)"
        image = np.random.default_rng(seed).integers(0, 256, (height, image, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_b64(b64: str) -> np.ndarray:
    """An answer's ``b64_json`` image as an (H, W, 3) uint8 array."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
