"""Model families: everything the three stages need from a checkpoint, declared once per family.

A family is one folder under ``stages/models/`` (``flux/``, ``qwen_image/``) whose ``family.py`` defines ``FAMILY``, an
instance of a :class:`ModelFamily` subclass, and one line in :data:`REGISTRY` (the pipeline class names of
``model_index.json`` it serves). Engines, the running set, the row strategies, sequence parallel, HSDP, the VAE
stage, the runtime and the HTTP layer read these declarations and never branch on a family's name.

What a family declares:

- **components**: the slots of its ``model_index.json`` and the classes each may hold (``check`` and the loaders);
- **text**: ``load_text_encoder`` returns a :class:`TextEncoder`, whose ``encode(prompts)`` gives one dict of tensors
  per prompt: the *branch* tensors (:attr:`ModelFamily.branch_dims`) the denoiser takes for that prompt; a negative
  prompt's dict travels under the same keys prefixed ``negative_``; it declares whether it also reads each prompt's
  input images (:attr:`TextEncoder.sees_images`);
- **denoiser**: ``load_transformer`` (with its ``_sp_plan`` / ``_pp_plan`` / HSDP shard conditions on the model),
  :meth:`~ModelFamily.row_args` (how the branches of a step's rows become the model's keyword arguments),
  :meth:`~ModelFamily.join_key` (which rows can share one forward), the rotary position ids, and the true-CFG
  :class:`~stages.guidance.Guidance` (which branches, how they combine);
- **vae**: a :class:`VaeKind` (load, scale factor, latent normalisation, decode, patch-parallel support);
- **support**: :attr:`~ModelFamily.unsupported` names each parallel mode the family cannot run and why, and
  :attr:`~ModelFamily.fields` says per request field what the family does with it.

The family of a directory is picked from ``model_index.json``'s ``_class_name`` (:func:`family_of`); an unknown or
unsupported pipeline class is a ``CheckpointError`` naming it and listing the supported ones, never a fallback.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from omni_runtime.stages.errors import CheckpointError, RequestError
from omni_runtime.stages.experts import ONE_EXPERT, ExpertSchedule
from omni_runtime.stages.guidance import Guidance
from omni_runtime.stages.weights import MODEL_INDEX, read_json

logger = logging.getLogger(__name__)

__all__ = ["REGISTRY", "Component", "ModelFamily", "TextEncoder", "VaeKind", "family_of", "family_for_class",
           "supported_pipelines"]

#: pipeline class (``model_index.json`` ``_class_name``) -> the module whose ``FAMILY`` serves it
REGISTRY: dict[str, str] = {
    "FluxPipeline": "omni_runtime.stages.models.flux.family",
    "QwenImagePipeline": "omni_runtime.stages.models.qwen_image.family",
    "FluxKontextPipeline": "omni_runtime.stages.models.flux.kontext",
    "WanPipeline": "omni_runtime.stages.models.wan.family",
    "QwenImageEditPipeline": "omni_runtime.stages.models.qwen_image.edit",
    "QwenImageEditPlusPipeline": "omni_runtime.stages.models.qwen_image.edit_plus",
}

#: pipeline classes whose directories look like a served family's but need what is not served yet: the reason
NOT_SERVED: dict[str, str] = {
    "WanImageToVideoPipeline": "an image-to-video model (it conditions on an input image); image-to-video is not "
                               "served yet",
}


@dataclass(frozen=True)
class Component:
    """One slot of ``model_index.json``: its library, the classes it may hold (empty for a tokenizer slot: any
    tokenizer class of transformers), its config file and its weights' file stem (None: no weights)."""

    library: str
    classes: tuple[str, ...] = ()
    config: str = "config.json"
    weights: str | None = None
    tokenizer: bool = False


class TextEncoder(Protocol):
    """What a family's text encoder is to the text-encoder engine. Every encoder declares :attr:`sees_images`."""

    #: True: ``encode(prompts, images=...)`` takes each prompt's input image files (Qwen-Image-Edit's Qwen2.5-VL
    #: with its vision tower) and refuses a prompt without any; False: ``encode(prompts)`` reads the text alone
    sees_images: bool

    def encode(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]: ...


class VaeKind:
    """A VAE class as the VAE stage uses it. Subclasses implement :meth:`load`, :meth:`scale_factor`,
    :meth:`latent_channels`, :meth:`to_decoder` and may refuse patch parallelism with :attr:`patch_refusal`."""

    class_name: str = ""
    #: why patch parallel decode cannot run for this VAE (None: it can, exactly)
    patch_refusal: str | None = None
    #: decode channels-last on CPU float32 (measured faster for 2D convolutions; docs/BENCHMARKS.md issue 16)
    channels_last: bool = False

    def load(self, directory: Path, dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError  # abstract

    def scale_factor(self, config: Mapping[str, Any]) -> int:
        """Pixels per latent row, from the VAE's config.json (the denoiser reads it without loading the VAE)."""
        raise NotImplementedError  # abstract

    def latent_channels(self, config: Mapping[str, Any]) -> int:
        raise NotImplementedError  # abstract

    def to_decoder(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """Unpacked denoiser latents (B, C, rows, cols) -> what the decoder's ``decode`` takes (de-normalised)."""
        raise NotImplementedError  # abstract

    def from_decoder(self, decoded: torch.Tensor) -> torch.Tensor:
        """The decoder's output -> images (B, 3, H, W) in [-1, 1] (a video VAE: (B, 3, frames, H, W))."""
        return decoded

    def encode(self, vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, rows, cols), as the family's edit pipeline
        encodes its input image (image edits)."""
        raise NotImplementedError  # abstract (a VAE that cannot encode: its families do not edit)

    #: a video VAE: ``to_decoder`` takes (B, C, latent frames, rows, cols), ``from_decoder`` gives frames
    video: bool = False

    def temporal_factor(self, config: Mapping[str, Any]) -> int:
        """Pixel frames per latent frame after the first (``(num_frames - 1) // factor + 1`` latent frames)."""
        return 1

    def check_patch(self, vae: nn.Module) -> None:
        """Raise ``parallel.vae_patch_parallel.VaePatchError`` unless :meth:`patch_decode` runs ``vae`` exactly (a
        kind without a patch-parallel walk: always, naming :attr:`patch_refusal`)."""
        from omni_runtime.parallel.vae_patch_parallel import VaePatchError

        raise VaePatchError(f"{self.class_name}: {self.patch_refusal or 'no patch-parallel decode'}; "
                            f"allowed: [stages.vae.parallel] patch = 1")

    def patch_decode(self, vae: nn.Module, z: torch.Tensor, patch: Any) -> torch.Tensor | None:
        """``vae.decode(z)`` split over ``patch`` (a ``PatchGroup``; every rank passes the same ``z``, the result
        comes back on group rank 0, ``None`` elsewhere). Only called after :meth:`check_patch` passed."""
        raise NotImplementedError  # abstract (a kind whose check_patch passes implements it)


class ModelFamily:
    """The declarations of one family (see the module docstring). Subclasses set the class attributes (the
    loaders' and the tiny maker's classes and functions as ``"module:name"``); the defaults suit a dual-stream DiT
    whose text tokens precede the image tokens."""

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()
    components: Mapping[str, Component] = {}
    #: the text encoder's tensors per prompt (one branch of a row) and the dims of each
    branch_dims: Mapping[str, int] = {"prompt_embeds": 2}
    #: the guidance of a request with a negative prompt and ``true_cfg_scale > 1``
    true_cfg: Guidance
    #: the transformer's block lists in execution order (what pipeline parallelism splits): module list name ->
    #: (the config key of its length, the length diffusers assumes when the key is absent)
    block_keys: Mapping[str, tuple[str, int]] = {}
    #: the embedded tiny models' presets (``make_tiny``)
    tiny_presets: tuple[str, ...] = ()
    #: the text encoder class as ``"module:Class"``: :meth:`load_text_encoder` calls its ``from_pretrained``
    text_encoder_class: str = ""
    #: the transformer class as ``"module:Class"``: :meth:`load_transformer` calls its ``from_pretrained``
    transformer_class: str = ""
    #: the tiny model maker as ``"module:function"``, ``function(path, preset=, seed=)``, of a module whose
    #: ``PRESETS`` name each preset's sizes (the block counts under the config keys of :attr:`block_keys`)
    tiny_maker: str = ""
    vae: VaeKind
    #: parallel modes this family cannot run, each with the reason (``check`` and the config checks print it)
    unsupported: Mapping[str, str] = {}
    #: request field -> what the family does with it (USAGE and ``check``)
    fields: Mapping[str, str] = {}
    #: request field -> its default for this family where the family's diffusers pipeline defaults it otherwise
    #: than ``runtime.requests.FIELDS`` (e.g. QwenImagePipeline's 50 steps): a request that leaves the field out
    #: gets what the pipeline called without it gives (the edge fills it in; the OpenAPI schema shows it)
    request_defaults: Mapping[str, Any] = {}
    #: rows of different image sizes may share one forward (their text positions do not depend on the size)
    mixed_sizes: bool = False
    #: image edits: input images a request may carry (0: the family does not edit; ``/v1/images/edits`` says so)
    image_inputs: int = 0
    #: image edits: the family takes a mask (inpainting)
    inpainting: bool = False
    #: image edits only: a request without input images (a generation) is refused at the edge, naming ``image``
    edits_only: bool = False
    #: cache methods (``stages.cache_config.METHODS``) the family cannot run, each with why: the edge refuses them
    #: naming ``cache`` (the denoiser's check of its model's ``CachePlan`` stays as the second line of defence)
    cache_refusals: Mapping[str, str] = {}
    #: the family makes videos: requests may ask for ``num_frames`` > 1 (its VAE is a video ``VaeKind``)
    video: bool = False
    #: the pipeline calls the scheduler's ``set_timesteps(steps)`` without sigmas (its own default timesteps);
    #: False: it passes ``sigmas = linspace(1, 1/steps, steps)`` as FluxPipeline does (``stages.schedule``)
    scheduler_timesteps: bool = False

    # --- loaders -----------------------------------------------------------------------------------------------

    def load_text_encoder(self, path: Path, dtype: torch.dtype, device: torch.device,
                          hsdp: Any = None) -> TextEncoder:
        return _declared_object(self.text_encoder_class).from_pretrained(path, dtype, device, hsdp=hsdp)

    def load_transformer(self, path: Path, dtype: torch.dtype, device: torch.device, *, ep_group: Any = None,
                         hsdp: Any = None, pp_group: Any = None) -> nn.Module:
        return _declared_object(self.transformer_class).from_pretrained(
            path, dtype=dtype, device=device, ep_group=ep_group, hsdp=hsdp, pp_group=pp_group)

    # --- the denoiser's rows -----------------------------------------------------------------------------------

    def text_len(self, branch: Mapping[str, torch.Tensor]) -> int:
        return int(branch["prompt_embeds"].shape[0])

    def check_branch(self, branch: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = "") -> None:
        """Raise :class:`RequestError` naming the tensor when a branch does not fit the transformer's config."""
        name = prefix + "prompt_embeds"
        seq = branch.get("prompt_embeds")
        if not isinstance(seq, torch.Tensor) or seq.dim() != 2 or seq.shape[0] < 1:
            shape = tuple(seq.shape) if isinstance(seq, torch.Tensor) else type(seq).__name__
            raise RequestError(f"{name} is {shape}; expected a (tokens, width) tensor with tokens >= 1")
        width = config.get("joint_attention_dim")
        if width is not None and seq.shape[-1] != width:
            raise RequestError(f"{name} has width {seq.shape[-1]}; this model takes {width}")

    def check_pipeline_config(self, model_index: Mapping[str, Any], source: Any = MODEL_INDEX) -> None:
        """Raise :class:`CheckpointError` for a ``model_index.json`` of a variant this family does not serve (its
        pipeline's own config keys); nothing by default."""

    def expert_schedule(self, model_dir: Path) -> ExpertSchedule:
        """The transformers of the checkpoint at ``model_dir`` and which one denoises each step
        (``stages.experts``); one transformer by default."""
        return ONE_EXPERT

    def check_branches(self, branches: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Rules between the branches of one request (e.g. equal text lengths); none by default."""

    def join_key(self, branches: Sequence[Mapping[str, torch.Tensor]]) -> Hashable:
        """Requests with equal keys (and equal image sizes) may share a forward; their rows stack."""
        return ()

    def row_args(self, branches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
        """The per-row keyword arguments of the transformer for rows whose branch tensors are ``branches``."""
        raise NotImplementedError  # abstract

    def image_ids(self, height: int, width: int, vae_scale_factor: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
        """(image tokens, 3) rotary position ids of an image's packed tokens."""
        raise NotImplementedError  # abstract

    def latent_channels(self, transformer_config: Mapping[str, Any]) -> int:
        """Channels of one latent pixel (the denoiser's noise); a packed token holds 4 of them (2x2 pixels)."""
        return int(transformer_config.get("in_channels", 64)) // 4

    def latent_ids(self, frames: int, height: int, width: int, vae_scale_factor: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
        """(tokens, 3) rotary position ids of the packed tokens of ``frames`` latent frames (an image: one)."""
        if frames != 1:
            raise RequestError(f"the {self.name} family makes images: {frames} latent frames; allowed: 1")
        return self.image_ids(height, width, vae_scale_factor, device, dtype)

    def text_ids(self, text_len: int, height: int, width: int, vae_scale_factor: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
        """(text tokens, 3) rotary position ids of the text tokens of rows of an image of ``height x width``."""
        raise NotImplementedError  # abstract

    # --- image edits: the condition tokens -----------------------------------------------------------------------

    def edit_output_size(self, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """The output size (width, height) of an edit with ``size = auto``, from its input images' sizes (before the
        edge rounds it to the model's multiple): the first image's by default."""
        return sizes[0]

    def condition_text_ids(self, text_ids: torch.Tensor, condition_ids: torch.Tensor) -> torch.Tensor:
        """The text tokens' position ids of a row with condition tokens at ``condition_ids``: ``text_ids`` as they
        are by default (a family whose text positions follow every image's size moves them)."""
        return text_ids

    def edit_image_size(self, width: int, height: int, multiple: int) -> tuple[int, int]:
        """The size an input image of ``width x height`` is resized to before the VAE encodes it (``multiple``: 2 x
        the VAE's scale factor)."""
        raise NotImplementedError  # abstract (only families with image_inputs > 0)

    def condition(self, tensors: Mapping[str, torch.Tensor], vae_scale_factor: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A request's condition tokens (tokens, C*4) and their rotary position ids (tokens, 3), from the encoded
        input images the VAE's encode added to its tensors (:data:`CONDITION_KEY`); they join the sequence after
        the image tokens and the prediction is sliced back. None: no condition (a generation)."""
        return None

    def blocks(self, transformer_config: Mapping[str, Any]) -> list[tuple[str, int]]:
        """The block lists pipeline parallelism splits: (module list name, length) in execution order."""
        return [(name, int(transformer_config.get(key, default))) for name, (key, default) in
                self.block_keys.items()]

    def make_tiny(self, path: Path, preset: str, seed: int = 0) -> Path:
        """Write the embedded model of ``preset`` (random weights, no download) at ``path``."""
        return _declared_object(self.tiny_maker)(path, preset=preset, seed=seed)

    def tiny_transformer_config(self, preset: str) -> dict[str, Any]:
        """The transformer config.json of ``preset`` before it is written (``check`` of a model still to make): its
        block counts."""
        sizes = _declared_object(self.tiny_maker.partition(":")[0] + ":PRESETS")[preset]
        return {key: getattr(sizes, key) for key, _ in self.block_keys.values()}

    def describe(self) -> list[str]:
        """What ``check`` prints about the family."""
        lines = [f"family: {self.name} (pipeline {', '.join(self.pipeline_classes)})"]
        lines.append("  components: " + ", ".join(f"{k} ({'tokenizer' if c.tokenizer else '/'.join(c.classes)})"
                                                   for k, c in self.components.items()))
        modes = [m for m in PARALLEL_MODES if m not in self.unsupported]
        lines.append("  parallel modes: " + ", ".join(modes))
        for mode, why in self.unsupported.items():
            lines.append(f"  not supported: {mode}: {why}")
        lines.extend(f"  request field {k}: {v}" for k, v in self.fields.items())
        if self.request_defaults:
            lines.append("  request defaults (the pipeline's own): "
                         + ", ".join(f"{k} = {v}" for k, v in self.request_defaults.items()))
        return lines


def _declared_object(spec: str) -> Any:
    """The object a family declares as ``"module:name"`` (imported when first used)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise NotImplementedError(f"{spec!r}: not declared as 'module:name'")  # abstract: the family declares none
    return getattr(importlib.import_module(module), name)


#: the key of the encoded input image among a request's tensors (the VAE's encode adds it; ``condition`` reads it);
#: input image i > 0 of an edit with several is ``CONDITION_KEY_i`` (:func:`condition_key_name`)
CONDITION_KEY = "image_latents"


def condition_key_name(index: int) -> str:
    """The tensor key of an edit's encoded input image ``index``."""
    return CONDITION_KEY if index == 0 else f"{CONDITION_KEY}_{index}"


def condition_keys(tensors: Mapping[str, Any]) -> list[str]:
    """The encoded input images' keys present in ``tensors``, in input order."""
    keys = []
    while condition_key_name(len(keys)) in tensors:
        keys.append(condition_key_name(len(keys)))
    return keys


#: the parallel modes a family may support (config keys of ``[stages.*.parallel]`` and denoiser options)
PARALLEL_MODES = ("ulysses", "ring", "cfg", "pp", "pipefusion", "hsdp_shard", "ep", "vae_patch", "mixed_sizes")


def supported_pipelines() -> list[str]:
    return sorted(REGISTRY)


def family_for_class(class_name: Any, where: str = MODEL_INDEX) -> ModelFamily:
    """The family serving pipeline class ``class_name``; an error naming it and the supported ones otherwise."""
    if class_name not in REGISTRY:
        supported = ", ".join(supported_pipelines())
        if isinstance(class_name, str) and class_name in NOT_SERVED:
            raise CheckpointError(f"{where}: _class_name = {class_name!r} is {NOT_SERVED[class_name]}; supported "
                                  f"pipeline classes: {supported}")
        raise CheckpointError(f"{where}: _class_name = {class_name!r} is not a supported pipeline class; supported: "
                              f"{supported}")
    return importlib.import_module(REGISTRY[class_name]).FAMILY


def family_of(model_dir: str | Path) -> ModelFamily:
    """The family of a diffusers model directory, from its ``model_index.json`` ``_class_name``."""
    path = Path(model_dir) / MODEL_INDEX
    return family_for_class(read_json(path).get("_class_name"), str(path))
