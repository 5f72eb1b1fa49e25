"""VAE decoder stage: packed latents -> uint8 HWC images, as the family's diffusers pipeline decodes and
postprocesses them. What differs between VAE classes (latent normalisation, a frame axis, the scale factor) is a
:class:`~stages.models.family.VaeKind` the model family declares; :class:`AutoencoderKLKind` (FLUX.1's) is here,
since the patch-parallel decode (``stages.vae_patch_decode``) is written for it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from omni_runtime.stages.device import resolve_device, resolve_dtype
from omni_runtime.stages.errors import CheckpointError, RequestError
from omni_runtime.stages.latents import (
    check_image_size,
    image_seq_len,
    latent_frames,
    unpack_latents,
    unpack_video_latents,
)
from omni_runtime.stages.models.family import ModelFamily, VaeKind, family_of
from omni_runtime.stages.weights import component_dir, read_config

if TYPE_CHECKING:
    from omni_runtime.parallel.vae_patch_parallel import PatchStats

logger = logging.getLogger(__name__)


def to_uint8_images(decoded: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) decoder output in [-1, 1] -> list of (H, W, 3) uint8, like ``VaeImageProcessor.postprocess``
    (``(x/2 + 0.5).clamp(0, 1)`` in the decoder dtype, then fp32 numpy ``* 255``, rounded)."""
    images = (decoded * 0.5 + 0.5).clamp(0, 1)
    arr = images.cpu().permute(0, 2, 3, 1).float().numpy()
    arr = (arr * 255).round().astype("uint8")
    return list(arr)


class AutoencoderKLKind(VaeKind):
    """diffusers' ``AutoencoderKL`` (FLUX.1's VAE): latents scaled by ``scaling_factor`` and shifted by
    ``shift_factor``; patch parallel decode is exact (``stages.vae_patch_decode``)."""

    class_name = "AutoencoderKL"
    channels_last = True

    def load(self, directory: Path, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        try:
            return AutoencoderKL.from_pretrained(str(directory), dtype=dtype)
        except Exception as e:  # anything a damaged checkpoint makes the loader raise (SafetensorError, ...)
            raise CheckpointError(f"{directory}: cannot load AutoencoderKL: {e}") from e

    def scale_factor(self, config: Any) -> int:
        return 2 ** (len(config["block_out_channels"]) - 1)

    def latent_channels(self, config: Any) -> int:
        return int(config.get("latent_channels", 4))

    def to_decoder(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        shift = vae.config.shift_factor
        return z / float(vae.config.scaling_factor) + (float(shift) if shift is not None else 0.0)

    def check_patch(self, vae: torch.nn.Module) -> None:
        from omni_runtime.stages.vae_patch_decode import check_supported

        check_supported(vae)

    def patch_decode(self, vae: torch.nn.Module, z: torch.Tensor, patch: Any) -> torch.Tensor | None:
        from omni_runtime.stages.vae_patch_decode import patch_decode

        return patch_decode(vae, z, patch)

    def encode(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """The latent distribution's mode (diffusers' ``retrieve_latents(..., sample_mode="argmax")``), shifted and
        scaled as ``FluxKontextPipeline._encode_vae_image`` does."""
        z = vae.encode(pixels).latent_dist.mode()
        shift = vae.config.shift_factor
        return (z - (float(shift) if shift is not None else 0.0)) * float(vae.config.scaling_factor)


class VaeDecoderStage:
    """Decodes packed latents (B, tokens, C*4), (tokens, C*4), or a list of those, of one image size into images.

    ``group`` (a ``GroupCoordinator``, every rank of it calling :meth:`decode` with the same latents) with more
    than one rank decodes patch-parallel (exact; the images come back on group rank 0, the other ranks get
    ``[]``). ``tiling`` turns on diffusers' tiled decode (approximate: it blends overlapping tiles; single rank
    only). ``kind``: the VAE class's :class:`~stages.models.family.VaeKind` (default: ``AutoencoderKL``'s)."""

    def __init__(self, vae: torch.nn.Module, dtype: torch.dtype, device: torch.device, *, group: Any = None,
                 tiling: bool = False, stats: PatchStats | None = None, kind: VaeKind | None = None,
                 family: ModelFamily | None = None) -> None:
        self.vae = vae
        self.family = family  # image edits: how an input image is resized before it is encoded
        self.kind = kind if kind is not None else AutoencoderKLKind()
        self.dtype = dtype
        self.device = device
        self.group = group if group is not None and group.world_size > 1 else None
        self.tiling = bool(tiling)
        if self.tiling and self.group is not None:
            from omni_runtime.parallel.vae_patch_parallel import VaePatchError

            raise VaePatchError("tiling = true (approximate) and patch parallelism (exact) cannot be combined; "
                                "allowed: tiling with a group of one rank")
        if self.tiling:
            vae.enable_tiling()
        self.patch = None
        if self.group is not None:
            from omni_runtime.parallel.vae_patch_parallel import PatchGroup, VaePatchError

            if self.kind.patch_refusal is not None:
                raise VaePatchError(f"[stages.vae.parallel] patch = {self.group.world_size}: "
                                    f"{self.kind.patch_refusal}; allowed: patch = 1")

            self.kind.check_patch(vae)
            self.patch = PatchGroup(self.group, stats)
        # On CPU in float32 the decoder's convolutions run channels-last (oneDNN's native layout): 0.77x the time
        # of a 256x256 decode on the 2-core VM (docs/BENCHMARKS.md, issue 16), values within float rounding of
        # NCHW. Not for bfloat16 (its rounding then moves pixels by up to 4 levels from diffusers') and not
        # measured on CUDA: there the layout stays as loaded.
        self.channels_last = device.type == "cpu" and dtype == torch.float32 and self.kind.channels_last
        if self.channels_last:
            vae.to(memory_format=torch.channels_last)
        self.vae_scale_factor = self.kind.scale_factor(vae.config)
        self.latent_channels = self.kind.latent_channels(vae.config)
        self.temporal_factor = self.kind.temporal_factor(vae.config)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", mesh: Any = None, *,
                        tiling: bool = False, stats: PatchStats | None = None) -> VaeDecoderStage:
        """Load ``<path>/vae`` with the VAE class the model family declares. ``mesh`` (a ``parallel.mesh.Mesh``,
        None: one process): its ``vae_patch`` group decodes patch-parallel; ``tiling``: see the class."""
        torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
        family = family_of(path)
        kind = family.vae
        directory = component_dir(path, "vae")
        read_config(directory, allowed_classes=(kind.class_name,))
        vae = kind.load(directory, torch_dtype)
        logger.info("loaded VAE %s from %s (%s on %s)", kind.class_name, path, torch_dtype, dev)
        group = None if mesh is None else mesh.group("vae_patch")
        return cls(vae.to(dev).eval(), torch_dtype, dev, group=group, tiling=tiling, stats=stats, kind=kind,
                   family=family)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor | list[torch.Tensor], height: int, width: int,
               num_frames: int = 1) -> list[np.ndarray]:
        """Packed latents of images of ``height`` x ``width`` pixels -> list of (H, W, 3) uint8 arrays; a video
        VAE's (``kind.video``) of videos of ``num_frames`` frames -> list of (frames, H, W, 3) uint8 arrays."""
        check_image_size(height, width, 2 * self.vae_scale_factor)
        frames = latent_frames(num_frames, self.temporal_factor) if self.kind.video else 1
        if isinstance(latents, (list, tuple)):
            if not latents:
                return []
            latents = torch.cat([x if x.dim() == 3 else x[None] for x in latents])
        elif latents.dim() == 2:
            latents = latents[None]
        expected = (image_seq_len(height, width, self.vae_scale_factor) * frames, 4 * self.latent_channels)
        if latents.dim() != 3 or tuple(latents.shape[1:]) != expected:
            raise RequestError(f"latents have shape {tuple(latents.shape)}; a {height}x{width} image takes packed "
                               f"latents ({expected[0]}, {expected[1]}) or (batch, {expected[0]}, {expected[1]})")
        if self.kind.video:
            x = unpack_video_latents(latents, frames, height, width, self.vae_scale_factor)
        else:
            x = unpack_latents(latents, height, width, self.vae_scale_factor)
        x = self.kind.to_decoder(self.vae, x.to(device=self.device, dtype=self.vae.dtype))
        decoded = self.decode_latents(x)
        if decoded is None:
            return []
        decoded = self.kind.from_decoder(decoded)
        if self.kind.video:  # (B, 3, F, H, W) -> one (F, H, W, 3) array per video
            return [np.stack(to_uint8_images(v.transpose(0, 1))) for v in decoded]
        return to_uint8_images(decoded)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor | None:
        """De-normalised, unpacked latents (B, C, rows, cols) (what the VAE's ``decode`` takes: ``kind.to_decoder``)
        -> the decoder's output, (B, 3, H, W) in [-1, 1] for ``AutoencoderKL``; ``None`` on the patch ranks other
        than group rank 0.

        Patch-parallel when the group has more ranks than 1 and every rank gets at least one latent row; with
        fewer latent rows than ranks, group rank 0 decodes alone (the single-rank numbers; the ranks only meet at a
        barrier) and the others return ``None``."""
        if self.patch is None:
            if self.channels_last:
                z = z.contiguous(memory_format=torch.channels_last)
            return self.vae.decode(z, return_dict=False)[0]
        if z.shape[-2] < self.patch.world_size:
            logger.info("%d latent rows < %d patch ranks: decoding on the driver alone", z.shape[-2],
                        self.patch.world_size)
            # the barrier: every rank has read its inputs before the driver returns (and releases them)
            self.patch.group.barrier()
            return self.vae.decode(z, return_dict=False)[0] if self.patch.rank == 0 else None
        return self.kind.patch_decode(self.vae, z, self.patch)

    __call__ = decode

    @torch.no_grad()
    def encode_image(self, data: bytes) -> torch.Tensor:
        """An input image file (image edits) -> its normalised latents (C, rows, cols): decoded to RGB, resized to
        the family's :meth:`~stages.models.family.ModelFamily.edit_image_size` and preprocessed by diffusers'
        ``VaeImageProcessor`` exactly as the family's edit pipeline does, then encoded by the VAE alone (on every
        rank of a patch group alike: the encoder is not split, so the result is the single-rank one)."""
        import io

        from diffusers.image_processor import VaeImageProcessor
        from PIL import Image

        if self.family is None or not self.family.image_inputs:
            raise RequestError("this model does not edit images (its family takes no input image)")
        with Image.open(io.BytesIO(data)) as img:
            image = img.convert("RGB")
        multiple = 2 * self.vae_scale_factor
        width, height = self.family.edit_image_size(image.width, image.height, multiple)
        check_image_size(height, width, multiple)
        processor = VaeImageProcessor(vae_scale_factor=multiple)
        pixels = processor.preprocess(processor.resize(image, height, width), height, width)
        z = self.kind.encode(self.vae, pixels.to(device=self.device, dtype=self.vae.dtype))
        return z[0].contiguous()
