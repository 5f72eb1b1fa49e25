"""The Wan 2.1 / 2.2 text-to-video family (``WanPipeline``): UMT5 as the text encoder, the video DiT of
``wan/transformer.py`` and ``AutoencoderKLWan`` (a causal 3D VAE with a temporal feature cache). Wan 2.2's two
experts (``transformer_2`` with ``boundary_ratio``) are declared by :meth:`WanFamily.expert_schedule`
(``stages.experts``); TI2V (``expand_timesteps``) is refused by name.

What differs from the image families, all declared here:

- it makes videos (:attr:`~ModelFamily.video`): a request's ``num_frames`` (4 k + 1) gives ``(num_frames - 1) // 4 + 1``
  latent frames; the denoiser's packed latents hold every frame's 2x2 patches, frame-major, and the rotary
  positions are (frame, row, column) per token;
- a prompt is a fixed 512-token sequence (zeros after the real tokens, as ``WanPipeline`` pads it), so any two
  requests of one video size share a forward;
- guidance is classifier-free guidance with a negative prompt (``WanPipeline``'s ``guidance_scale``, default 5):
  the runtime runs it as the true-CFG combine ``uncond + s (cond - uncond)`` (:data:`TRUE_CFG`); the video edge
  (``runtime.video_api``) sends ``guidance_scale`` as ``true_cfg_scale`` and ``""`` as the default negative prompt;
- the VAE decodes (B, 16, latent frames, rows, cols) de-normalised with ``latents_mean`` / ``latents_std``;
- the pipeline calls ``set_timesteps(steps)`` without sigmas (:attr:`scheduler_timesteps`); a checkpoint's
  ``UniPCMultistepScheduler`` (Wan 2.1's own) is stepped per request by diffusers' class
  (``stages.schedule.DiffusersStepper``), a ``FlowMatchEulerDiscreteScheduler`` by the runtime's Euler step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.experts import ONE_EXPERT, ExpertSchedule
from omni_runtime.stages.guidance import TRUE_CFG
from omni_runtime.stages.models.causal_vae_kind import CausalVaeKind
from omni_runtime.stages.models.family import Component, ModelFamily
from omni_runtime.stages.weights import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS


class AutoencoderKLWanKind(CausalVaeKind):
    """diffusers' ``AutoencoderKLWan`` as ``WanPipeline`` decodes with it: latents de-normalised per channel
    (``z / (1 / std) + mean``), the whole video decoded by diffusers' own ``decode`` (which already streams over the
    latent frames, one at a time through the causal convolutions' feature cache), clamped to [-1, 1]. Patch
    parallel decode is exact (``stages/causal_vae_patch.py``: row bands with halos, a feature cache per rank, Ring
    attention in the mid block)."""

    class_name = "AutoencoderKLWan"
    video = True

    def load(self, directory: Path, dtype: torch.dtype) -> nn.Module:
        from diffusers import AutoencoderKLWan

        try:
            return AutoencoderKLWan.from_pretrained(str(directory), dtype=dtype)
        except Exception as e:  # anything a damaged checkpoint makes the loader raise
            raise CheckpointError(f"{directory}: cannot load AutoencoderKLWan: {e}") from e

    def scale_factor(self, config: Mapping[str, Any]) -> int:
        if config.get("patch_size") is not None:
            raise CheckpointError(f"AutoencoderKLWan patch_size={config['patch_size']!r} (the Wan 2.2 TI2V VAE) is "
                                  f"not served; allowed: null")
        return int(config.get("scale_factor_spatial") or 8)

    def temporal_factor(self, config: Mapping[str, Any]) -> int:
        return int(config.get("scale_factor_temporal") or 4)

    def patch_modules(self) -> Any:
        """The module classes the causal 3D VAE's patch-parallel walk runs (``stages/causal_vae_patch.py``)."""
        from diffusers.models.autoencoders import autoencoder_kl_wan as m

        from omni_runtime.stages.causal_vae_patch import CausalVaeModules

        return CausalVaeModules(self.class_name, m.WanCausalConv3d, m.WanRMS_norm, m.WanResample, m.WanUpBlock,
                                m.WanAttentionBlock)

    def to_decoder(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        mean, std = self.latent_stats(vae, z)
        inv_std = 1.0 / std
        return z / inv_std + mean


#: why Wan has no TeaCache (the edge's 400 and the denoiser's refusal say it)
TEACACHE_REFUSAL = ("has no TeaCache here: diffusers implements none for Wan, and the TeaCache4Wan2.1 polynomials are "
                    "fitted per checkpoint (1.3B, 14B; with or without its retention steps), so no one polynomial holds "
                    "for the family")


class WanFamily(ModelFamily):
    name = "wan"
    pipeline_classes = ("WanPipeline",)
    components = {
        "tokenizer": Component("transformers", tokenizer=True, config="tokenizer_config.json"),
        "text_encoder": Component("transformers", ("UMT5EncoderModel", "T5EncoderModel"),
                                  weights=TRANSFORMERS_WEIGHTS),
        "transformer": Component("diffusers", ("WanTransformer3DModel",), weights=DIFFUSERS_WEIGHTS),
        "vae": Component("diffusers", ("AutoencoderKLWan",), weights=DIFFUSERS_WEIGHTS),
        "scheduler": Component("diffusers", ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"),
                               "scheduler_config.json"),
    }
    branch_dims = {"prompt_embeds": 2}
    true_cfg = TRUE_CFG
    block_keys = {"blocks": ("num_layers", 40)}
    vae = AutoencoderKLWanKind()
    video = True
    scheduler_timesteps = True  # WanPipeline calls set_timesteps(steps) without sigmas
    cache_refusals = {"teacache": TEACACHE_REFUSAL}
    tiny_presets = ("tiny", "small", "tiny22")
    text_encoder_class = "omni_runtime.stages.models.wan.text:WanTextEncoder"
    transformer_class = "omni_runtime.stages.models.wan.transformer:WanTransformer"
    tiny_maker = "omni_runtime.stages.models.wan.tiny:make_tiny_wan"
    unsupported = {
        "pipefusion": "PipeFusion's stale K/V was not validated for video tokens; use pp_mode = 'layer'",
        "ep": "the Wan transformer has no mixture-of-experts layers",
        "mixed_sizes": "videos of different sizes or frame counts do not share a forward",
    }
    fields = {
        "num_frames": "frames of the video, 4 k + 1 (WanPipeline's default 81)",
        "guidance_scale": "classifier-free guidance with the negative prompt when > 1 (WanPipeline's default 5.0); "
                          "the video API sends it to the denoiser as true_cfg_scale",
        "negative_prompt": "the unconditional branch's prompt ('' when absent, as WanPipeline)",
        "guidance_scale_2": "two-expert (Wan 2.2) checkpoints: the guidance of the steps transformer_2 denoises "
                            "(timesteps below boundary_ratio x 1000; default guidance_scale); refused for one expert",
    }

    def check_pipeline_config(self, model_index: Mapping[str, Any], source: Any = "model_index.json") -> None:
        """Wan 2.2's two experts (``transformer_2`` with ``boundary_ratio``) are served when both are given and
        ``transformer_2/`` is a ``WanTransformer3DModel`` next to ``model_index.json``; one without the other is
        refused, and so is TI2V's per-token timesteps (``expand_timesteps``)."""
        two, ratio = _declared(model_index.get("transformer_2")), model_index.get("boundary_ratio")
        if two is not None or ratio is not None:
            if two is None or ratio is None or isinstance(ratio, bool) or not isinstance(ratio, int | float) \
                    or not 0 < ratio <= 1:
                raise CheckpointError(f"{source}: transformer_2 = {two!r}, boundary_ratio = {ratio!r}: a two-expert "
                                      f"Wan 2.2 checkpoint needs both; allowed: transformer_2 ['diffusers', "
                                      f"'WanTransformer3DModel'] with boundary_ratio in (0, 1], or neither (Wan 2.1)")
            if two != ["diffusers", "WanTransformer3DModel"]:
                raise CheckpointError(f"{source}: transformer_2 = {two!r} is not supported; allowed: ['diffusers', "
                                      f"'WanTransformer3DModel']")
            directory = Path(str(source)).parent / "transformer_2"
            if Path(str(source)).name == "model_index.json" and not (directory / "config.json").is_file():
                raise CheckpointError(f"{directory}: the second expert of this two-expert Wan 2.2 checkpoint is "
                                      f"missing (transformer_2 is listed in {source}; no config.json there)")
        if model_index.get("expand_timesteps"):
            raise CheckpointError(f"{source}: expand_timesteps = true: Wan 2.2 TI2V's per-token timesteps are not "
                                  f"served; allowed: expand_timesteps false")

    def expert_schedule(self, model_dir: Path) -> ExpertSchedule:
        """Wan 2.2 (``transformer_2`` + ``boundary_ratio``): ``transformer`` at timesteps >= ``boundary_ratio x
        num_train_timesteps``, ``transformer_2`` below, as ``WanPipeline``; Wan 2.1: one transformer."""
        from omni_runtime.stages.weights import MODEL_INDEX, read_json

        index_path = Path(model_dir) / MODEL_INDEX
        index = read_json(index_path)
        self.check_pipeline_config(index, index_path)
        if _declared(index.get("transformer_2")) is None:
            return ONE_EXPERT
        scheduler = Path(model_dir) / "scheduler" / "scheduler_config.json"
        train = read_json(scheduler).get("num_train_timesteps", 1000) if scheduler.is_file() else 1000
        return ExpertSchedule(("transformer", "transformer_2"), float(index["boundary_ratio"]) * train)

    def check_branch(self, branch: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = "") -> None:
        super().check_branch(branch, {"joint_attention_dim": config.get("text_dim")}, prefix)

    def load_transformer(self, path: Path, dtype: torch.dtype, device: torch.device, *, ep_group: Any = None,
                         hsdp: Any = None, pp_group: Any = None) -> nn.Module:
        from omni_runtime.stages.weights import MODEL_INDEX, read_json

        index = Path(path).parent / MODEL_INDEX
        if index.is_file():
            self.check_pipeline_config(read_json(index), index)
        return super().load_transformer(path, dtype, device, ep_group=ep_group, hsdp=hsdp, pp_group=pp_group)

    def latent_channels(self, transformer_config: Mapping[str, Any]) -> int:
        return int(transformer_config.get("in_channels", 16))

    def row_args(self, branches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
        return {"encoder_hidden_states": torch.stack([b["prompt_embeds"] for b in branches])}

    def join_key(self, branches: Sequence[Mapping[str, torch.Tensor]]) -> tuple:
        return (int(branches[0]["prompt_embeds"].shape[0]),)

    def latent_ids(self, frames: int, height: int, width: int, vae_scale_factor: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
        from omni_runtime.stages.models.wan.transformer import video_ids

        return video_ids(frames, height // vae_scale_factor // 2, width // vae_scale_factor // 2, device)

    def image_ids(self, height: int, width: int, vae_scale_factor: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
        return self.latent_ids(1, height, width, vae_scale_factor, device, dtype)

    def text_ids(self, text_len: int, height: int, width: int, vae_scale_factor: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
        """Not used by the model (its text has no rotary positions): zeros, so the shared argument exists."""
        return torch.zeros(text_len, 3, device=device, dtype=torch.float32)


def _declared(slot: Any) -> Any:
    """A ``model_index.json`` slot as given, or None when it is absent or ``[null, null]``."""
    return None if slot is None or (isinstance(slot, list) and all(x is None for x in slot)) else slot


FAMILY = WanFamily()
