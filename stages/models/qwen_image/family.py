"""The Qwen-Image family (``QwenImagePipeline``): Qwen2.5-VL's language model as the text encoder, the dual-stream
MMDiT of ``qwen_image/transformer.py``, and ``AutoencoderKLQwenImage`` (a causal 3D VAE used with one frame).

What differs from Flux, all declared here:

- a prompt is one variable-length sequence of hidden states (no pooled vector, no fixed length): rows of a step
  with different text lengths are padded to the longest and the padding is masked out of attention
  (``encoder_hidden_states_mask``), so requests with any prompts share a forward;
- the text tokens' rotary positions follow the image's (``max(grid_h // 2, grid_w // 2) + j``), so rows of
  different image sizes never share a forward (no ``mixed_sizes``);
- true CFG rescales the combined prediction to the conditional one's norm per token (:data:`TRUE_CFG_NORM`);
- the VAE takes (B, C, frames = 1, H, W) latents de-normalised with ``latents_mean`` / ``latents_std``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.guidance import TRUE_CFG_NORM
from omni_runtime.stages.models.causal_vae_kind import CausalVaeKind
from omni_runtime.stages.models.family import Component, ModelFamily
from omni_runtime.stages.weights import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS


class AutoencoderKLQwenImageKind(CausalVaeKind):
    """diffusers' ``AutoencoderKLQwenImage`` as QwenImagePipeline decodes with it: a frame axis of one, latents
    de-normalised per channel (``z / (1 / std) + mean``), the decoder's first frame. Patch parallel decode is
    exact: Wan 2.1's decoder under Qwen-Image's class names, run by the same walk (``stages/causal_vae_patch.py``)."""

    class_name = "AutoencoderKLQwenImage"

    def load(self, directory: Path, dtype: torch.dtype) -> nn.Module:
        from diffusers import AutoencoderKLQwenImage

        try:
            return AutoencoderKLQwenImage.from_pretrained(str(directory), dtype=dtype)
        except Exception as e:  # anything a damaged checkpoint makes the loader raise (SafetensorError, ...)
            raise CheckpointError(f"{directory}: cannot load AutoencoderKLQwenImage: {e}") from e

    def scale_factor(self, config: Mapping[str, Any]) -> int:
        return 2 ** len(config.get("temperal_downsample", (False, True, True)))

    def patch_modules(self) -> Any:
        """The module classes the causal 3D VAE's patch-parallel walk runs (``stages/causal_vae_patch.py``)."""
        from diffusers.models.autoencoders import autoencoder_kl_qwenimage as m

        from omni_runtime.stages.causal_vae_patch import CausalVaeModules

        return CausalVaeModules(self.class_name, m.QwenImageCausalConv3d, m.QwenImageRMS_norm, m.QwenImageResample,
                                m.QwenImageUpBlock, m.QwenImageAttentionBlock)

    def to_decoder(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        mean, std = self.latent_stats(vae, z)
        inv_std = 1.0 / std
        return z[:, :, None] / inv_std + mean

    def from_decoder(self, decoded: torch.Tensor) -> torch.Tensor:
        return decoded[:, :, 0]

    def encode(self, vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """The latent distribution's mode of the one-frame video, normalised ``(z - mean) / std`` as
        ``QwenImageEditPipeline._encode_vae_image`` does (image edits)."""
        z = vae.encode(pixels[:, :, None]).latent_dist.mode()
        mean, std = self.latent_stats(vae, z)
        return ((z - mean) / std)[:, :, 0]


class QwenImageFamily(ModelFamily):
    name = "qwen_image"
    pipeline_classes = ("QwenImagePipeline",)
    components = {
        "tokenizer": Component("transformers", tokenizer=True, config="tokenizer_config.json"),
        "text_encoder": Component("transformers", ("Qwen2_5_VLForConditionalGeneration",),
                                  weights=TRANSFORMERS_WEIGHTS),
        "transformer": Component("diffusers", ("QwenImageTransformer2DModel",), weights=DIFFUSERS_WEIGHTS),
        "vae": Component("diffusers", ("AutoencoderKLQwenImage",), weights=DIFFUSERS_WEIGHTS),
        "scheduler": Component("diffusers", ("FlowMatchEulerDiscreteScheduler",), "scheduler_config.json"),
    }
    branch_dims = {"prompt_embeds": 2}
    true_cfg = TRUE_CFG_NORM
    block_keys = {"transformer_blocks": ("num_layers", 60)}
    vae = AutoencoderKLQwenImageKind()
    tiny_presets = ("tiny", "small")
    text_encoder_class = "omni_runtime.stages.models.qwen_image.text:QwenImageTextEncoder"
    transformer_class = "omni_runtime.stages.models.qwen_image.transformer:QwenImageTransformer"
    tiny_maker = "omni_runtime.stages.models.qwen_image.tiny:make_tiny_qwen_image"
    cache_refusals = {"teacache": "has no published TeaCache coefficients"}  # its transformer's CachePlan has none
    unsupported = {
        "pipefusion": "PipeFusion's stale K/V was not validated with masked variable-length text; use "
                      "pp_mode = 'layer'",
        "ep": "the Qwen-Image transformer has no mixture-of-experts layers",
        "mixed_sizes": "its text tokens' rotary positions depend on the image size, so rows of different sizes "
                       "cannot share a forward",
    }
    fields = {
        "true_cfg_scale": "true CFG (two branches per step, the result rescaled to the conditional prediction's "
                          "norm) when > 1 and negative_prompt is given; default 4.0, as QwenImagePipeline's",
        "negative_prompt": "used only with true_cfg_scale > 1 (diffusers suggests ' ' for none)",
        "guidance_scale": "ignored: Qwen-Image has no guidance embedding (as in diffusers)",
    }
    #: QwenImagePipeline's (and the edit pipelines') ``__call__`` defaults
    request_defaults = {"num_inference_steps": 50, "true_cfg_scale": 4.0}

    def row_args(self, branches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
        """Each row's text padded (with zeros) to the longest row's; the padding masked out of attention."""
        embeds = [b["prompt_embeds"] for b in branches]
        lens = [e.shape[0] for e in embeds]
        longest = max(lens)
        if len(set(lens)) == 1:
            return {"encoder_hidden_states": torch.stack(embeds), "encoder_hidden_states_mask": None}
        padded = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in embeds])
        mask = torch.arange(longest, device=padded.device)[None, :] < torch.tensor(lens, device=padded.device)[:, None]
        return {"encoder_hidden_states": padded, "encoder_hidden_states_mask": mask}

    def image_ids(self, height: int, width: int, vae_scale_factor: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
        from omni_runtime.stages.models.qwen_image.transformer import image_ids

        return image_ids(height // vae_scale_factor // 2, width // vae_scale_factor // 2, device)

    def text_ids(self, text_len: int, height: int, width: int, vae_scale_factor: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
        from omni_runtime.stages.models.qwen_image.transformer import text_ids

        return text_ids(text_len, height // vae_scale_factor // 2, width // vae_scale_factor // 2, device)


FAMILY = QwenImageFamily()
