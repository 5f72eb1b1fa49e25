"""The Qwen-Image-Edit family (``QwenImageEditPipeline``): Qwen-Image conditioned on one input image, twice.

Everything but the conditioning is Qwen-Image's (``qwen_image/family.py``): the transformer, VAE, scheduler and true
CFG. What differs, as in diffusers' ``pipeline_qwenimage_edit.py``:

- the text encoder sees the image (``qwen_image/edit_text.py``): Qwen2.5-VL with its vision tower, the edit chat
  template, the ``processor/`` component;
- the VAE encodes the image resized to ``calculate_dimensions(1024 * 1024, width / height)`` (:meth:`edit_image_size`;
  its latent distribution's mode, normalised with ``latents_mean`` / ``latents_std``); its packed tokens join the
  sequence after the noise tokens with their own rotary positions (frame 1, the rows and columns centred as the
  output image's are: diffusers' ``img_shapes`` entry ``(1, h, w)`` at index 1) and the prediction is sliced back;
- the text tokens' positions start after the largest of ALL the images' half-grids (``QwenEmbedRope``'s
  ``max_vid_index``), the condition's included;
- ``size = auto`` is the pipeline's default output size: ``calculate_dimensions(1024 * 1024, ratio)`` of the image.

The Plus variant (``QwenImageEditPlusPipeline``, several images) is ``qwen_image/edit_plus.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from omni_runtime.stages.latents import pack_latents
from omni_runtime.stages.models.family import Component, condition_keys
from omni_runtime.stages.models.qwen_image.edit_text import VAE_IMAGE_AREA, calculate_dimensions
from omni_runtime.stages.models.qwen_image.family import QwenImageFamily

PIPELINE = "QwenImageEditPipeline"


class QwenImageEditFamily(QwenImageFamily):
    name = "qwen_image_edit"
    pipeline_classes = (PIPELINE,)
    components = {**QwenImageFamily.components,
                  "processor": Component("transformers", ("Qwen2VLProcessor",), "preprocessor_config.json")}
    tiny_presets = ("tiny", "small")
    image_inputs = 1
    edits_only = True  # its text encoder conditions on the input image: no generation without one
    #: Plus: the Plus template and condition size in the text encoder, the last image picks ``size = auto``
    plus = False
    unsupported = {**QwenImageFamily.unsupported,
                   "pipefusion": "PipeFusion splits the sequence into patches of image-token rows; the condition "
                                 "image's tokens are no rows of the output image"}
    fields = {**QwenImageFamily.fields,
              "image": "one input image: the text encoder (Qwen2.5-VL's vision tower) sees it resized to "
                       "calculate_dimensions(1024*1024, width/height) and then to the processor's max_pixels; the "
                       "VAE encodes it at calculate_dimensions(1024*1024, width/height) (sides multiples of 32), "
                       "whatever the output size",
              "size": "WxH: the pipeline's width=W, height=H; auto: its default, calculate_dimensions(1024*1024, "
                      "width/height) of the input image"}

    def load_text_encoder(self, path: Path, dtype: torch.dtype, device: torch.device, hsdp: Any = None) -> Any:
        from omni_runtime.stages.denoiser import vae_scale_factor_of
        from omni_runtime.stages.models.qwen_image.edit_text import QwenImageEditTextEncoder

        return QwenImageEditTextEncoder.from_pretrained(path, dtype, device, hsdp=hsdp, plus=self.plus,
                                                        multiple=2 * vae_scale_factor_of(path, self))

    def make_tiny(self, path: Path, preset: str, seed: int = 0) -> Path:
        from omni_runtime.stages.models.qwen_image.edit_tiny import make_tiny_qwen_image_edit

        return make_tiny_qwen_image_edit(path, self.pipeline_classes[0], preset=preset, seed=seed)

    def edit_image_size(self, width: int, height: int, multiple: int) -> tuple[int, int]:
        return calculate_dimensions(VAE_IMAGE_AREA, width / height)

    def edit_output_size(self, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
        width, height = sizes[-1] if self.plus else sizes[0]
        return calculate_dimensions(VAE_IMAGE_AREA, width / height)

    def condition(self, tensors: Mapping[str, torch.Tensor], vae_scale_factor: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        from omni_runtime.stages.models.qwen_image.transformer import image_ids

        keys = condition_keys(tensors)
        if not keys:
            return None
        tokens, ids = [], []
        for i, key in enumerate(keys):
            z = tensors[key].to(device=device, dtype=dtype)
            tokens.append(pack_latents(z[None] if z.dim() == 3 else z)[0])
            pos = image_ids(z.shape[-2] // 2, z.shape[-1] // 2, device)
            pos[:, 0] = i + 1  # diffusers' img_shapes index: the output image is 0, input image i is i + 1
            ids.append(pos)
        return torch.cat(tokens), torch.cat(ids)

    def condition_text_ids(self, text_ids: torch.Tensor, condition_ids: torch.Tensor) -> torch.Tensor:
        # a centred grid of n rows has ids -(n - n//2) .. n//2 - 1: its half-grid n//2 is its largest id + 1
        start = int(condition_ids[:, 1:].max().item()) + 1
        return text_ids + max(0, start - int(text_ids[0, 0].item()))

FAMILY = QwenImageEditFamily()
