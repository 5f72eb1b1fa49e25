"""The files of a video: its frames as a zip of lossless PNGs (what the VAE stage sends back and ``variant=frames``
serves), the H.264 mp4 (PyAV) and the PNG thumbnail (the first frame)."""

from __future__ import annotations

import io
import logging
import zipfile

import numpy as np

logger = logging.getLogger(__name__)

PNG_COMPRESS_LEVEL = 1  # as runtime.images: fast zlib, lossless either way
MP4_CRF = 18  # x264's constant rate factor: visually lossless (about 40 dB PSNR on natural video)


def encode_frames(frames: np.ndarray) -> bytes:
    """(F, H, W, 3) uint8 -> a zip (stored, no compression: PNG is compressed) of ``frame_00000.png``, ..."""
    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i, frame in enumerate(frames):
            png = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(frame)).save(png, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            zf.writestr(f"frame_{i:05d}.png", png.getvalue())
    return buf.getvalue()


def decode_frames(data: bytes) -> np.ndarray:
    """The inverse of :func:`encode_frames`: (F, H, W, 3) uint8."""
    from PIL import Image

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        return np.stack([np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names])


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """(F, H, W, 3) uint8 -> an H.264 mp4 (yuv420p, every frame kept) through PyAV."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(MP4_CRF)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_mp4(data: bytes) -> np.ndarray:
    """An mp4's frames as (F, H, W, 3) uint8 (tests, clients)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def thumbnail(frames_zip: bytes) -> bytes:
    """The first frame's PNG, as stored in the frames zip."""
    with zipfile.ZipFile(io.BytesIO(frames_zip)) as zf:
        return zf.read(sorted(n for n in zf.namelist() if n.endswith(".png"))[0])
