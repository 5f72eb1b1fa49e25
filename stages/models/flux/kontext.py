"""The FLUX.1-Kontext family (``FluxKontextPipeline``): FLUX.1 conditioned on an input image.

Everything but the condition is FLUX.1's (``flux/family.py``): the same components, text encoders, transformer and
VAE. The input image, resized to its own size rounded down to 16 (diffusers' ``_auto_resize=False``), is encoded
by the VAE stage (the latent distribution's mode, normalised like FLUX.1's latents); its packed tokens join the
sequence after the noise tokens with position ids ``(1, row, col)`` (the noise tokens' first id is 0), and the
transformer's output is sliced back to the noise tokens, as in diffusers' ``pipeline_flux_kontext.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from omni_runtime.stages.latents import latent_image_ids, pack_latents
from omni_runtime.stages.models.family import CONDITION_KEY
from omni_runtime.stages.models.flux.family import FluxFamily
from omni_runtime.stages.weights import DIFFUSERS_WEIGHTS, MODEL_INDEX

PIPELINE = "FluxKontextPipeline"
ENCODER_GAIN = 24.0  # the tiny Kontext VAE encoder's mean channels (see make_tiny)
ATTENTION_GAIN = 8.0  # the tiny Kontext transformer's q/k norm weights (see make_tiny)


class FluxKontextFamily(FluxFamily):
    name = "flux-kontext"
    pipeline_classes = (PIPELINE,)
    tiny_presets = ("tiny", "small")
    image_inputs = 1
    unsupported = {"pipefusion": "PipeFusion splits the sequence into patches of image-token rows; the condition "
                                 "image's tokens are no rows of the output image"}
    fields = {**FluxFamily.fields,
              "image": "one input image; it is encoded at its own size rounded down to 16 (diffusers' "
                       "_auto_resize=False), whatever the output size"}

    def edit_image_size(self, width: int, height: int, multiple: int) -> tuple[int, int]:
        return width // multiple * multiple, height // multiple * multiple

    def condition(self, tensors: Mapping[str, torch.Tensor], vae_scale_factor: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        z = tensors.get(CONDITION_KEY)
        if z is None:
            return None
        z = z.to(device=device, dtype=dtype)
        tokens = pack_latents(z[None] if z.dim() == 3 else z)[0]
        ids = latent_image_ids(z.shape[-2] * vae_scale_factor, z.shape[-1] * vae_scale_factor, vae_scale_factor,
                               device, dtype)
        ids[:, 0] = 1
        return tokens, ids

    def make_tiny(self, path: Path, preset: str, seed: int = 0) -> Path:
        """The tiny FLUX.1 model declared as a ``FluxKontextPipeline``, with two changes that make its output
        depend on the input image (with the FLUX.1 weights as they are, the condition moves a pixel by at most one
        level, so no test could tell a wrong condition from a right one): the VAE encoder's mean channels are
        scaled by :data:`ENCODER_GAIN`, so the encoded image has the spread of the noise latents (a trained VAE's
        ``scaling_factor`` gives it that), and the attention's q/k RMSNorm weights by :data:`ATTENTION_GAIN`,
        so attention is sharp enough to pick out the condition tokens among 512 text tokens. The decoder and
        everything else stay the tiny FLUX.1 model's."""
        from safetensors.torch import load_file, save_file

        out = super().make_tiny(path, preset, seed)
        vae_file = Path(out) / "vae" / f"{DIFFUSERS_WEIGHTS}.safetensors"
        sd = load_file(vae_file)
        channels = json.loads((Path(out) / "vae" / "config.json").read_text())["latent_channels"]
        for key in ("encoder.conv_out.weight", "encoder.conv_out.bias"):
            sd[key][:channels] *= ENCODER_GAIN
        save_file(sd, vae_file, metadata={"format": "pt"})
        dit_file = Path(out) / "transformer" / f"{DIFFUSERS_WEIGHTS}.safetensors"
        sd = load_file(dit_file)
        for key in sd:
            if key.rsplit(".", 2)[-2] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                sd[key] *= ATTENTION_GAIN
        save_file(sd, dit_file, metadata={"format": "pt"})
        index_path = Path(out) / MODEL_INDEX
        index: dict[str, Any] = json.loads(index_path.read_text())
        index["_class_name"] = PIPELINE
        index_path.write_text(json.dumps(index, indent=2))
        return out


FAMILY = FluxKontextFamily()
