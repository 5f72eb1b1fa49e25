"""What diffusers' causal 3D VAEs (``AutoencoderKLWan``, ``AutoencoderKLQwenImage``) share as a :class:`VaeKind`:
``z_dim`` latent channels, per-channel ``latents_mean`` / ``latents_std``, and the patch-parallel decode of
``stages/causal_vae_patch.py`` over the module classes each kind names in :meth:`CausalVaeKind.patch_modules`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from omni_runtime.stages.models.family import VaeKind


class CausalVaeKind(VaeKind):
    """A causal 3D VAE of diffusers; a subclass names its module classes (:meth:`patch_modules`)."""

    def latent_channels(self, config: Mapping[str, Any]) -> int:
        return int(config.get("z_dim", 16))

    def patch_modules(self) -> Any:
        """The ``CausalVaeModules`` (causal conv, RMS norm, resample, up block, attention classes) the walk runs."""
        raise NotImplementedError  # abstract: every causal kind names its classes

    def check_patch(self, vae: nn.Module) -> None:
        from omni_runtime.stages.causal_vae_patch import check_supported

        check_supported(vae, self.patch_modules())

    def patch_decode(self, vae: nn.Module, z: torch.Tensor, patch: Any) -> torch.Tensor | None:
        from omni_runtime.stages.causal_vae_patch import patch_decode

        return patch_decode(vae, z, patch, self.patch_modules())

    @staticmethod
    def latent_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``latents_mean`` and ``latents_std`` as (1, C, 1, 1, 1) tensors on ``like``'s device and dtype."""
        c = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(like.device, like.dtype)
        return mean, std
