"""In-process pipeline: text encoder -> denoiser -> VAE decoder, the reference the distributed runtime is checked
against. A single prompt with seed ``s`` gives the image diffusers' FluxPipeline gives with
``generator=torch.Generator("cpu").manual_seed(s)``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from omni_runtime.stages.denoiser import DenoiseRequest, DenoiserStage
from omni_runtime.stages.errors import RequestError
from omni_runtime.stages.text_encoder import MAX_T5_SEQUENCE_LENGTH, TextEncoderStage
from omni_runtime.stages.vae import VaeDecoderStage

logger = logging.getLogger(__name__)


def _as_list(value: str | list[str] | None, n: int, field: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value] * n
    if not isinstance(value, list) or len(value) != n or not all(isinstance(v, str) for v in value):
        raise RequestError(f"{field}={value!r} is not allowed; give one string, or a list of {n} strings "
                           f"(one per prompt)")
    return value


class Pipeline:
    """Chains :class:`TextEncoderStage`, :class:`DenoiserStage` and :class:`VaeDecoderStage` in one process."""

    def __init__(self, text_encoder: TextEncoderStage, denoiser: DenoiserStage, vae: VaeDecoderStage) -> None:
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.vae = vae

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", *, vae_tiling: bool = False) -> Pipeline:
        """Load all three stages from a diffusers-format FLUX model directory (``vae_tiling``: diffusers' tiled,
        approximate decode)."""
        return cls(TextEncoderStage.from_pretrained(path, dtype, device),
                   DenoiserStage.from_pretrained(path, dtype, device),
                   VaeDecoderStage.from_pretrained(path, dtype, device, tiling=vae_tiling))

    def requests(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                 seed: int | list[int] = 0, num_inference_steps: int = 28, height: int = 1024,
                 width: int = 1024, guidance_scale: float = 3.5, true_cfg_scale: float = 1.0,
                 max_sequence_length: int = MAX_T5_SEQUENCE_LENGTH) -> list[DenoiseRequest]:
        """Encode the prompts and build one :class:`DenoiseRequest` per prompt."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts:
            raise RequestError(f"prompt={prompt!r} is not allowed; give a string or a non-empty list of strings")
        n = len(prompts)
        if isinstance(seed, (list, tuple)):
            if len(seed) != n:
                raise RequestError(f"seed={list(seed)!r} has {len(seed)} values for {n} prompts; give one integer, "
                                   f"or a list of {n} integers (one seed per prompt)")
            seeds = list(seed)
        else:
            seeds = [seed] * n
        negatives = _as_list(negative_prompt, n, "negative_prompt")
        if isinstance(true_cfg_scale, bool) or not isinstance(true_cfg_scale, (int, float)):
            raise RequestError(f"true_cfg_scale={true_cfg_scale!r} is not allowed; it must be a finite number")
        do_cfg = true_cfg_scale > 1 and negatives is not None
        enc = self.text_encoder.encode(prompts, max_sequence_length=max_sequence_length)
        neg = self.text_encoder.encode(negatives, max_sequence_length=max_sequence_length) if do_cfg else None
        return [
            DenoiseRequest(
                prompt_embeds=enc["prompt_embeds"][i], pooled_prompt_embeds=enc["pooled_prompt_embeds"][i],
                seed=seeds[i], height=height, width=width, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
                negative_prompt_embeds=neg["prompt_embeds"][i] if neg else None,
                negative_pooled_prompt_embeds=neg["pooled_prompt_embeds"][i] if neg else None,
            )
            for i in range(n)
        ]

    def __call__(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                 seed: int | list[int] = 0, num_inference_steps: int = 28, height: int = 1024, width: int = 1024,
                 guidance_scale: float = 3.5, true_cfg_scale: float = 1.0,
                 max_sequence_length: int = MAX_T5_SEQUENCE_LENGTH, progress: bool = False) -> list[np.ndarray]:
        """Generate one (height, width, 3) uint8 image per prompt."""
        reqs = self.requests(prompt, negative_prompt=negative_prompt, seed=seed,
                             num_inference_steps=num_inference_steps, height=height, width=width,
                             guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
                             max_sequence_length=max_sequence_length)
        latents = self.denoiser.denoise(reqs, progress=progress)
        return self.vae.decode(torch.stack(latents), height, width)
