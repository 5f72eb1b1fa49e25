"""Qwen-Image-Edit text encoding: Qwen2.5-VL WITH its vision tower on the input image(s), as
``QwenImageEditPipeline.encode_prompt`` / ``QwenImageEditPlusPipeline.encode_prompt`` compute the prompt embeddings.

Per prompt (a negative prompt sees the same images): the input images are decoded and resized as the pipeline
resizes its ``prompt_image`` / ``condition_images`` (diffusers' ``VaeImageProcessor.resize`` to
``calculate_dimensions(area, width / height)``: Edit, the one image at :data:`VAE_IMAGE_AREA` = 1024 x 1024, the
size the VAE encodes it at; Plus, every image at :data:`CONDITION_IMAGE_AREA` = 384 x 384), then processed by the
checkpoint's ``processor/`` image processor (Qwen2-VL's patches, its ``min_pixels``/``max_pixels``); each
``<|image_pad|>`` of the chat template becomes as many pad tokens as the image has merged patches (what
``Qwen2VLProcessor`` does); the language model runs with ``pixel_values`` and ``image_grid_thw``, and the last hidden
state minus the template's first 64 tokens is the prompt's ``prompt_embeds`` (no truncation: the edit pipelines
have none). The images reach this stage as the request's image files (``GenerationRequest.images``), as they reach
the VAE's encode.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from omni_runtime.stages.device import resolve_device, resolve_dtype
from omni_runtime.stages.errors import CheckpointError, RequestError
from omni_runtime.stages.weights import component_dir, read_model_index

logger = logging.getLogger(__name__)

# These mirror diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline (set in their __init__ and module).
SYSTEM_PREFIX = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
TEMPLATE = SYSTEM_PREFIX + "{}<|im_end|>\n<|im_start|>assistant\n"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
PICTURE = "Picture {}: " + VISION  # Plus: one per input image, numbered from 1
IMAGE_PAD = "<|image_pad|>"
TEMPLATE_START_IDX = 64  # prompt_template_encode_start_idx: tokens dropped from the embeddings
VAE_IMAGE_AREA = 1024 * 1024
CONDITION_IMAGE_AREA = 384 * 384
PROCESSOR_SLOT = "processor"


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels at ``ratio`` = width / height, multiples of 32 (diffusers'
    ``calculate_dimensions`` of the edit pipelines)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as dims

    width, height = dims(area, ratio)
    return int(width), int(height)


def open_image(data: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def resize(image: Any, area: int, multiple: int) -> Any:
    """``image`` resized as the pipelines resize it for the text encoder (``VaeImageProcessor.resize``)."""
    from diffusers.image_processor import VaeImageProcessor

    width, height = calculate_dimensions(area, image.width / image.height)
    return VaeImageProcessor(vae_scale_factor=multiple).resize(image, height, width)


class QwenImageEditTextEncoder:
    """``encode(prompts, images)``: per prompt, ``{"prompt_embeds": (tokens, hidden)}`` as the edit pipeline's
    ``encode_prompt`` gives it for that prompt and its input images (``images[i]``: the image files of prompt i).
    ``plus``: the Plus template ("Picture N: ..." per image, each image at the 384 x 384 area)."""

    #: the text-encoder engine passes each prompt's input images (``TextEncoderEngine.step``;
    #: ``stages.models.family.TextEncoder``)
    sees_images = True

    def __init__(self, tokenizer: Any, image_processor: Any, text_encoder: torch.nn.Module, device: torch.device,
                 *, plus: bool, multiple: int) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.text_encoder = text_encoder
        self.device = device
        self.plus = plus
        self.multiple = multiple  # the pipeline's VaeImageProcessor's vae_scale_factor (2 x the VAE's)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", hsdp: Any = None, *, plus: bool = False,
                        multiple: int = 16) -> QwenImageEditTextEncoder:
        """Load the ``processor`` (its tokenizer and image processor) and ``text_encoder`` (Qwen2.5-VL, vision tower
        included) of an edit model directory."""
        import transformers

        from omni_runtime.stages.models.qwen_image.text import _load_text_encoder

        torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
        index = read_model_index(path)
        directory = component_dir(path, PROCESSOR_SLOT)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
            images = transformers.AutoImageProcessor.from_pretrained(str(directory), local_files_only=True)
        except Exception as e:  # anything a damaged processor directory makes the loaders raise
            raise CheckpointError(f"{directory}: cannot load the processor's tokenizer / image processor: {e}") from e
        enc = _load_text_encoder(path, index, torch_dtype, dev, hsdp)
        logger.info("loaded the Qwen-Image-Edit%s text encoder from %s (%s on %s)", " Plus" if plus else "", path,
                    torch_dtype, dev)
        return cls(tok, images, enc.to(dev).eval(), dev, plus=plus, multiple=multiple)

    def _text_and_images(self, prompt: str, files: Sequence[bytes]) -> tuple[str, list[Any]]:
        if not files:
            raise RequestError("image is required: this model's text encoder conditions on the input image(s), so it "
                               "only edits; allowed: POST /v1/images/edits with an image")
        if self.plus:
            pictures = [resize(open_image(f), CONDITION_IMAGE_AREA, self.multiple) for f in files]
            return TEMPLATE.format("".join(PICTURE.format(i + 1) for i in range(len(files))) + prompt), pictures
        if len(files) != 1:
            raise RequestError(f"image: {len(files)} images; allowed: 1 (QwenImageEditPipeline takes one)")
        return TEMPLATE.format(VISION + prompt), [resize(open_image(files[0]), VAE_IMAGE_AREA, self.multiple)]

    @torch.no_grad()
    def encode_one(self, prompt: str, files: Sequence[bytes]) -> dict[str, torch.Tensor]:
        text, pictures = self._text_and_images(prompt, files)
        vision = self.image_processor(images=pictures, return_tensors="pt")
        grid = vision["image_grid_thw"]
        merge = int(self.image_processor.merge_size) ** 2
        parts = text.split(IMAGE_PAD)
        assert len(parts) == len(pictures) + 1, (len(parts), len(pictures))
        text = parts[0] + "".join(IMAGE_PAD * (int(g.prod()) // merge) + p for g, p in zip(grid, parts[1:],
                                                                                          strict=True))
        ids = self.tokenizer(text, return_tensors="pt").input_ids.to(self.device)
        out = self.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                                pixel_values=vision["pixel_values"].to(self.device, self.text_encoder.dtype),
                                image_grid_thw=grid.to(self.device), output_hidden_states=True)
        hidden = out.hidden_states[-1].to(dtype=self.text_encoder.dtype)
        return {"prompt_embeds": hidden[0, TEMPLATE_START_IDX:].contiguous()}

    def encode(self, prompts: list[str], images: Sequence[Sequence[bytes]] | None = None
               ) -> list[dict[str, torch.Tensor]]:
        """One prompt at a time (the pipelines encode each prompt with its own images, batch 1)."""
        if images is None or len(images) != len(prompts):
            raise RequestError("image is required: this model only edits; allowed: POST /v1/images/edits with an image")
        return [self.encode_one(p, files) for p, files in zip(prompts, images, strict=True)]

    __call__ = encode
