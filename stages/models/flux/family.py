"""The FLUX.1 family (``FluxPipeline``): CLIP + T5 text encoders, the MMDiT of ``models/flux``, AutoencoderKL."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from omni_runtime.stages.errors import RequestError
from omni_runtime.stages.guidance import TRUE_CFG
from omni_runtime.stages.latents import latent_image_ids
from omni_runtime.stages.models.family import Component, ModelFamily
from omni_runtime.stages.vae import AutoencoderKLKind
from omni_runtime.stages.weights import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS

SCHEDULER = Component("diffusers", ("FlowMatchEulerDiscreteScheduler",), "scheduler_config.json")


class FluxText:
    """The CLIP + T5 encoders (``stages.text_encoder.TextEncoderStage``) as a family text encoder: one dict of
    branch tensors per prompt."""

    sees_images = False  # the text alone (``stages.models.family.TextEncoder``)

    def __init__(self, stage: Any) -> None:
        self.stage = stage

    @classmethod
    def from_pretrained(cls, path: Path, dtype: torch.dtype, device: torch.device, hsdp: Any = None) -> FluxText:
        from omni_runtime.stages.text_encoder import TextEncoderStage

        return cls(TextEncoderStage.from_pretrained(path, dtype, device, hsdp=hsdp))

    def encode(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        enc = self.stage.encode(prompts)
        return [{"prompt_embeds": enc["prompt_embeds"][i], "pooled_prompt_embeds": enc["pooled_prompt_embeds"][i]}
                for i in range(len(prompts))]


class FluxFamily(ModelFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    components = {
        "tokenizer": Component("transformers", tokenizer=True, config="tokenizer_config.json"),
        "text_encoder": Component("transformers", ("CLIPTextModel",), weights=TRANSFORMERS_WEIGHTS),
        "tokenizer_2": Component("transformers", tokenizer=True, config="tokenizer_config.json"),
        "text_encoder_2": Component("transformers", ("T5EncoderModel",), weights=TRANSFORMERS_WEIGHTS),
        "transformer": Component("diffusers", ("FluxTransformer2DModel",), weights=DIFFUSERS_WEIGHTS),
        "vae": Component("diffusers", ("AutoencoderKL",), weights=DIFFUSERS_WEIGHTS),
        "scheduler": SCHEDULER,
    }
    branch_dims = {"prompt_embeds": 2, "pooled_prompt_embeds": 1}
    true_cfg = TRUE_CFG
    block_keys = {"transformer_blocks": ("num_layers", 19), "single_transformer_blocks": ("num_single_layers", 38)}
    tiny_presets = ("tiny", "small")
    text_encoder_class = "omni_runtime.stages.models.flux.family:FluxText"
    transformer_class = "omni_runtime.stages.models.flux.transformer:FluxTransformer"
    tiny_maker = "omni_runtime.stages.models.flux.tiny:make_tiny_model"
    vae = AutoencoderKLKind()
    mixed_sizes = True
    fields = {
        "guidance_scale": "the embedded guidance of a model with guidance embeddings (FLUX.1-dev); ignored by one "
                          "without (FLUX.1-schnell)",
        "true_cfg_scale": "true CFG (two branches per step) when > 1 and negative_prompt is given",
        "negative_prompt": "used only with true_cfg_scale > 1",
    }

    def check_branch(self, branch: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = "") -> None:
        super().check_branch(branch, config, prefix)
        name = prefix + "pooled_prompt_embeds"
        pooled = branch.get("pooled_prompt_embeds")
        if not isinstance(pooled, torch.Tensor) or pooled.dim() != 1:
            shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
            raise RequestError(f"{name} is {shape}; expected a (width,) tensor")
        width = config.get("pooled_projection_dim")
        if width is not None and pooled.shape[-1] != width:
            raise RequestError(f"{name} has width {pooled.shape[-1]}; this model takes {width}")

    def check_branches(self, branches: Sequence[Mapping[str, torch.Tensor]]) -> None:
        lens = [self.text_len(b) for b in branches]
        if len(set(lens)) > 1:
            raise RequestError(f"negative_prompt_embeds has {lens[1]} tokens and prompt_embeds {lens[0]}; they must "
                               f"be equal (encode both with the same max_sequence_length), as in diffusers")

    def join_key(self, branches: Sequence[Mapping[str, torch.Tensor]]) -> Hashable:
        return (self.text_len(branches[0]),)

    def row_args(self, branches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
        return {"encoder_hidden_states": torch.stack([b["prompt_embeds"] for b in branches]),
                "pooled_projections": torch.stack([b["pooled_prompt_embeds"] for b in branches])}

    def image_ids(self, height: int, width: int, vae_scale_factor: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
        return latent_image_ids(height, width, vae_scale_factor, device, dtype)

    def text_ids(self, text_len: int, height: int, width: int, vae_scale_factor: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(text_len, 3, device=device, dtype=dtype)


FAMILY = FluxFamily()
