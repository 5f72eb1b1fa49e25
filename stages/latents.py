"""Flux latent geometry: size checks, 2x2 packing, latent image ids, and seeded initial noise.

Everything here mirrors diffusers' ``FluxPipeline`` (``_pack_latents``, ``_unpack_latents``,
``_prepare_latent_image_ids``, ``prepare_latents``) so a seed gives the same image.
"""

from __future__ import annotations

import logging

import torch

from omni_runtime.stages.errors import RequestError

logger = logging.getLogger(__name__)

# The VAE downsamples by 8 and Flux packs 2x2 latent patches into one token: pixels per token edge.
PIXEL_MULTIPLE = 16


def _nearest_multiples(value: int, multiple: int) -> list[int]:
    """The valid sizes either side of ``value`` (just the smallest valid size below it)."""
    if value <= multiple:
        return [multiple]
    low = (value // multiple) * multiple
    return [low, low + multiple]


def check_image_size(height: int, width: int, multiple: int = PIXEL_MULTIPLE) -> None:
    """Raise :class:`RequestError` unless ``height`` and ``width`` are positive multiples of ``multiple``."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"{name}={value!r} is not an integer; image sizes are integers, "
                               f"multiples of {multiple}")
        if value < multiple or value % multiple:
            nearest = " or ".join(str(c) for c in _nearest_multiples(value, multiple))
            raise RequestError(f"{name}={value} is not a positive multiple of {multiple}; "
                               f"nearest valid {name}: {nearest}")


def latent_size(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Unpacked latent (height, width) for an image size, as diffusers computes it."""
    return 2 * (int(height) // (vae_scale_factor * 2)), 2 * (int(width) // (vae_scale_factor * 2))


def image_seq_len(height: int, width: int, vae_scale_factor: int) -> int:
    """Number of packed image tokens for an image size."""
    lh, lw = latent_size(height, width, vae_scale_factor)
    return (lh // 2) * (lw // 2)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches become tokens."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """(B, tokens, C*4) -> (B, C, H_lat, W_lat) for an image of ``height`` x ``width`` pixels."""
    b, _, channels = latents.shape
    lh, lw = latent_size(height, width, vae_scale_factor)
    latents = latents.view(b, lh // 2, lw // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, lh, lw)


def latent_image_ids(height: int, width: int, vae_scale_factor: int, device: torch.device | str,
                     dtype: torch.dtype) -> torch.Tensor:
    """(tokens, 3) position ids (0, row, col) of the packed image tokens."""
    lh, lw = latent_size(height, width, vae_scale_factor)
    h2, w2 = lh // 2, lw // 2
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


def latent_frames(num_frames: int, temporal_factor: int) -> int:
    """Latent frames of a video of ``num_frames`` frames (a causal video VAE: the first frame alone, then one latent
    frame per ``temporal_factor`` frames); 1 for an image."""
    return (int(num_frames) - 1) // int(temporal_factor) + 1


def pack_video_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, F * H/2 * W/2, C*4): 2x2 patches of each frame become tokens, frame-major; one frame
    packs as :func:`pack_latents` packs its (B, C, H, W)."""
    b, c, f, h, w = latents.shape
    latents = latents.view(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6)
    return latents.reshape(b, f * (h // 2) * (w // 2), c * 4)


def unpack_video_latents(latents: torch.Tensor, frames: int, height: int, width: int,
                         vae_scale_factor: int) -> torch.Tensor:
    """(B, tokens, C*4) -> (B, C, frames, H_lat, W_lat), the inverse of :func:`pack_video_latents`."""
    b, _, channels = latents.shape
    lh, lw = latent_size(height, width, vae_scale_factor)
    latents = latents.view(b, frames, lh // 2, lw // 2, channels // 4, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
    return latents.reshape(b, channels // 4, frames, lh, lw)


def initial_noise(seed: int, num_channels_latents: int, height: int, width: int, vae_scale_factor: int,
                  dtype: torch.dtype, device: torch.device | str, frames: int = 1) -> torch.Tensor:
    """Packed initial latents (1, tokens, C*4) for one request.

    Drawn exactly as diffusers' ``FluxPipeline.prepare_latents`` draws them for a batch of one with
    ``generator=torch.Generator("cpu").manual_seed(seed)``: one ``randn`` of shape (1, C, H, W) in
    ``dtype`` on the CPU, moved to ``device``, then packed. ``frames`` > 1 (a video): one ``randn`` of shape
    (1, C, frames, H, W) in float32, as ``WanPipeline.prepare_latents`` draws it, cast to ``dtype``, packed
    frame-major.
    """
    lh, lw = latent_size(height, width, vae_scale_factor)
    gen = torch.Generator("cpu").manual_seed(int(seed))
    if frames != 1:
        noise = torch.randn((1, num_channels_latents, frames, lh, lw), generator=gen, device="cpu",
                            dtype=torch.float32)
        return pack_video_latents(noise.to(device=device, dtype=dtype))
    noise = torch.randn((1, num_channels_latents, lh, lw), generator=gen, device="cpu", dtype=dtype)
    return pack_latents(noise.to(device))
