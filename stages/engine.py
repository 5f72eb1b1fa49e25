"""Stage engines: what one stage computes for a batch, as pure compute over typed items.

An engine is loaded once per rank (on the stage's mesh) and then only asked two things:

- ``batch_key(item)``: items with equal keys may run in one ``step``;
- ``step(items, stop=None)``: one output per item, in order. ``stop`` (the denoiser asks it before every
  denoising step) names items to take out of a running batch; their output is ``None``.

Engines do no I/O: no sockets, no shared memory, no processes. The runtime's process shell (or its in-process
client) moves items in and outputs out; both run these same engines, so there is one pipeline.

An item carries the request (anything with the fields of :class:`RequestParams`, e.g. the runtime's
``GenerationRequest``, validated at the API edge), the seed of this image, and the previous stage's output.
Outputs: the text encoder gives a dict of the family's branch tensors per item, the denoiser packed latents
(tokens, C*4), the VAE an (H, W, 3) uint8 array. The model family (``stages.models.family``) of the directory is
read at load; the engines themselves are the same for every family.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from omni_runtime.stages.cache_config import CacheConfig
from omni_runtime.stages.denoiser import NEGATIVE, DenoiseRequest, DenoiserStage, StopHook
from omni_runtime.stages.device import resolve_device, resolve_dtype
from omni_runtime.stages.errors import RequestError
from omni_runtime.stages.lora import LoraSpec
from omni_runtime.stages.models.family import TextEncoder, condition_key_name, family_of
from omni_runtime.stages.step_batch import RunningSet, preview_steps
from omni_runtime.stages.vae import VaeDecoderStage

logger = logging.getLogger(__name__)

__all__ = ["ENGINES", "DenoiserEngine", "Engine", "LoraParams", "RequestParams", "StageItem", "StepEngine", "StopHook",
           "TextEncoderEngine", "VaeEngine", "load_engine"]


#: the VAE's second job (``StageItem.task``): an edit's input image to latents
ENCODE = "encode"
#: the VAE's third job: a streamed request's preview (the denoiser's predicted clean latent at an intermediate step),
#: decoded like a final image in batches of its own, after the final images waiting (``runtime.stage_exec``)
PREVIEW = "preview"


class LoraParams(Protocol):
    """One LoRA adapter of a request as the denoiser reads it (``runtime.requests.LoraRef`` has these fields)."""

    name: str
    path: str
    version: int
    scale: float


class RequestParams(Protocol):
    """Every request field the engines read (``runtime.requests.GenerationRequest`` has them, validated at the
    edge; ``tests/test_engine_params.py`` holds it to this list). The engines read them as attributes, with no
    defaults of their own: a request type without one of them fails loudly, not with a silent default."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    #: two-expert video models: the true-CFG scale of transformer_2's steps; None: ``true_cfg_scale``
    true_cfg_scale_2: float | None
    #: a video model's frames; 1: an image
    num_frames: int
    #: the request's LoRA adapters (the denoiser loads and combines them)
    lora: Sequence[LoraParams]
    #: cache acceleration (``stages.block_cache``); None: none
    cache: CacheConfig | None
    #: image edits: the input image files (the text encoder's and the VAE's encode); empty: a generation
    images: Sequence[bytes]
    #: streamed answers: previews per image the denoiser makes (0: none)
    partial_images: int


@dataclass
class StageItem:
    """One image of one request at one stage."""

    params: RequestParams
    seed: int
    inputs: Any = None  # the previous stage's output for this image (tensors), None for the first stage
    #: what the stage does with it when it has more than one job: ``"encode"`` at the VAE (an edit's input image
    #: to latents, before the denoiser); ``""`` the stage's one job
    task: str = ""


def uses_true_cfg(p: RequestParams) -> bool:
    """The pipelines' rule: true CFG runs when ``true_cfg_scale > 1`` and a negative prompt is given."""
    return p.negative_prompt is not None and p.true_cfg_scale > 1


class Engine(Protocol):
    name: str

    def batch_key(self, item: StageItem) -> Hashable: ...

    def step(self, items: list[StageItem], stop: StopHook | None = None) -> list[Any]: ...


@runtime_checkable
class StepEngine(Engine, Protocol):
    """An engine with a running set (the denoiser): under step-level scheduling the runtime admits and retires
    items between steps (``runtime.driver_loop``) and every rank of the stage does the same in the same order."""

    running: Sized  # the items in the running set (``len``)

    def join_key(self, item: StageItem) -> Hashable:
        """Items with equal keys can run in one step's forward."""
        ...

    def row_tokens(self, item: StageItem) -> tuple[int, int]:
        """(image tokens per row, rows) of ``item`` in a step's forward (mixed sizes' padding waste)."""
        ...

    @property
    def padding_waste(self) -> float: ...

    def admit(self, slot: int, item: StageItem) -> None:
        """Add ``item`` as ``slot``; raises (before it joins) for what the model cannot run."""
        ...

    def drop(self, slot: int) -> bool: ...

    def progress(self, slot: int) -> tuple[int, int]:
        """(steps done, steps in all) of ``slot``."""
        ...

    def run_step(self) -> dict[int, Any]:
        """One step of every running item; the outputs of those that finished, by slot."""
        ...

    def cache_stats(self, slot: int) -> dict[str, int | str] | None:
        """What the cache acceleration skipped for ``slot`` (``stages.block_cache``); None without a cache."""
        ...

    def take_previews(self) -> dict[int, tuple[int, Any]]:
        """The previews the last step kept (streamed requests' ``partial_images``): slot -> (steps done, the
        predicted clean latents); ``{}`` for an engine that makes no previews."""
        ...


class TextEncoderEngine:
    """Prompts -> the family's branch tensors per item (Flux: ``{"prompt_embeds", "pooled_prompt_embeds"}``), and
    the negative prompt's under the same keys prefixed ``negative_`` for items that use true CFG. All prompts of a
    step (positive and negative) are encoded in one call."""

    name = "text_encoder"

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder

    @classmethod
    def load(cls, path: str | Path, dtype: str, device: str, mesh: Any = None) -> TextEncoderEngine:
        from omni_runtime.parallel.hsdp import hsdp_config_from_mesh  # None unless the mesh shards weights

        hsdp = hsdp_config_from_mesh(mesh) if mesh is not None else None
        family = family_of(path)
        return cls(family.load_text_encoder(Path(path), resolve_dtype(dtype), resolve_device(device), hsdp=hsdp))

    def batch_key(self, item: StageItem) -> Hashable:
        # an encoder that sees the input images refuses an item without any: such items batch apart, so one
        # refused request never fails an edit batched with it
        return (bool(item.params.images),) if self.encoder.sees_images else ()

    def step(self, items: list[StageItem], stop: StopHook | None = None) -> list[dict[str, torch.Tensor]]:
        neg_idx = [i for i, it in enumerate(items) if uses_true_cfg(it.params)]
        prompts = [it.params.prompt for it in items] + [items[i].params.negative_prompt for i in neg_idx]
        if self.encoder.sees_images:  # its embeddings see each prompt's input images
            images = [it.params.images for it in items]
            enc = self.encoder.encode(prompts, images=images + [images[i] for i in neg_idx])
        else:
            enc = self.encoder.encode(prompts)
        outs = [dict(enc[i]) for i in range(len(items))]
        for j, i in enumerate(neg_idx):
            outs[i].update({NEGATIVE + k: v for k, v in enc[len(items) + j].items()})
        return outs


class DenoiserEngine:
    """Embeddings -> packed latents per item; items leave a running batch between steps when ``stop`` says so."""

    name = "denoiser"

    def __init__(self, stage: DenoiserStage) -> None:
        self.stage = stage
        #: the step-level running set (``admit`` / ``drop`` / ``run_step``), the same on every rank
        self.running = RunningSet(stage, batch_invariant=stage.batch_invariant)

    @classmethod
    def load(cls, path: str | Path, dtype: str, device: str, mesh: Any = None, *,
             batch_invariant: bool = False, mixed_sizes: bool = False, cpu_linear: str = "onednn",
             lora_max_loaded: int = 8, lora_preload: Mapping[str, str] | None = None,
             compile: bool = False) -> DenoiserEngine:
        """``batch_invariant``: one forward per request, bit-identical to its solo run (``stages.step_batch``);
        ``mixed_sizes``: requests of different image sizes share a step's forward (padded and masked);
        ``cpu_linear``: the linear layers' kernel on CPU (``stages.cpu_linear``); ``lora_max_loaded``: LoRA
        adapters this rank keeps loaded (``stages.lora``, ``[lora] max_loaded``); ``lora_preload``: ``[lora] adapters``
        (name -> file), loaded now on this rank (``LoraBank.preload``), not on the first request that names one.
        ``compile``: ``torch.compile`` the transformer's blocks (``stages.compile``)."""
        from omni_runtime.parallel.all2all import init_expert_parallel  # None unless the mesh has ep > 1
        from omni_runtime.parallel.hsdp import hsdp_config_from_mesh  # None unless the mesh shards weights

        hsdp = hsdp_config_from_mesh(mesh) if mesh is not None else None
        from omni_runtime.stages.lora import configured_specs

        engine = cls(DenoiserStage.from_pretrained(path, dtype, device, mesh=mesh,
                                                   ep_group=init_expert_parallel(mesh), hsdp=hsdp,
                                                   batch_invariant=batch_invariant, mixed_sizes=mixed_sizes,
                                                   cpu_linear=cpu_linear, lora_max_loaded=lora_max_loaded,
                                                   compile=compile))
        if lora_preload:
            engine.stage.lora.preload(configured_specs(lora_preload))
        return engine

    @staticmethod
    def request(item: StageItem) -> DenoiseRequest:
        """The denoiser's view of an item: the request's numbers joined with the text encoder's tensors."""
        t, p = item.inputs, item.params
        cfg = uses_true_cfg(p)
        embeds = {k: v for k, v in t.items() if cfg or not k.startswith(NEGATIVE)}
        return DenoiseRequest(
            embeds=embeds, seed=item.seed, height=p.height, width=p.width,
            num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
            true_cfg_scale=p.true_cfg_scale, num_frames=p.num_frames, true_cfg_scale_2=p.true_cfg_scale_2,
            lora=tuple(LoraSpec(r.name, r.path, r.version, r.scale) for r in p.lora), cache=p.cache,
            previews=preview_steps(p.num_inference_steps, p.partial_images))

    def batch_key(self, item: StageItem) -> Hashable:
        return self.stage.batch_key(self.request(item))

    def step(self, items: list[StageItem], stop: StopHook | None = None) -> list[torch.Tensor | None]:
        latents = self.stage.denoise([self.request(it) for it in items], stop=stop)
        return [x.contiguous() if x is not None else None for x in latents]

    # --- step level: the runtime admits and retires items between steps (runtime.driver_loop) ------------------

    def join_key(self, item: StageItem) -> Hashable:
        """Items with equal keys can run in one step-level forward (any step counts, with or without CFG)."""
        return self.stage.join_key(self.request(item))

    def row_tokens(self, item: StageItem) -> tuple[int, int]:
        """(image tokens per row, rows) of ``item`` in a step's forward (the padding waste of mixed sizes)."""
        return self.stage.row_tokens(self.request(item))

    @property
    def padding_waste(self) -> float:
        """Padded image tokens / all image tokens of the last step's forwards."""
        return self.running.padding_waste

    def admit(self, slot: int, item: StageItem) -> None:
        """Add ``item`` to the running set as ``slot``; raises (``RequestError`` for what the model cannot run)
        before it joins. Its input tensors are copied."""
        self.running.admit(slot, self.request(item))

    def drop(self, slot: int) -> bool:
        return self.running.drop(slot)

    def progress(self, slot: int) -> tuple[int, int]:
        return self.running.progress(slot)

    def run_step(self) -> dict[int, torch.Tensor]:
        """One step of every running item; the outputs (packed latents) of those that finished, by slot."""
        return {k: v.contiguous() for k, v in self.running.step().items()}

    def cache_stats(self, slot: int) -> dict[str, int | str] | None:
        """What the cache skipped for an item that finished in the last step (None: it ran uncached)."""
        stats = self.running.cache_stats(slot)
        return stats.as_dict() if stats is not None else None

    def take_previews(self) -> dict[int, tuple[int, torch.Tensor]]:
        """The previews of the last step: slot -> (steps done, predicted clean packed latents (tokens, C*4))."""
        return {k: (d, x.contiguous()) for k, (d, x) in self.running.take_previews().items()}


class VaeEngine:
    """Packed latents -> (H, W, 3) uint8 images; one step decodes items of one size."""

    name = "vae"

    def __init__(self, stage: VaeDecoderStage) -> None:
        self.stage = stage

    @classmethod
    def load(cls, path: str | Path, dtype: str, device: str, mesh: Any = None, *, tiling: bool = False) -> VaeEngine:
        """``mesh``'s ``vae_patch`` group decodes patch-parallel; ``tiling``: diffusers' approximate tiled decode."""
        return cls(VaeDecoderStage.from_pretrained(path, dtype, device, mesh=mesh, tiling=tiling))

    def batch_key(self, item: StageItem) -> Hashable:
        if item.task == ENCODE:
            return (ENCODE,)
        # previews batch apart from final images
        return (item.task, item.params.width, item.params.height, item.params.num_frames)

    def step(self, items: list[StageItem], stop: StopHook | None = None) -> list[Any]:
        """The images (a video model: (frames, H, W, 3) arrays) on the driver; ``[]`` on the other ranks of a
        patch-parallel replica (rank 0 gathers). ``encode`` items (image edits): the text encoder's tensors with the
        encoded input image added (:data:`~stages.models.family.CONDITION_KEY`), one item at a time as the edit
        pipelines encode it. :data:`PREVIEW` items decode as final images do."""
        if items[0].task == ENCODE:
            return [self.encode(it) for it in items]
        p = items[0].params
        assert all(self.batch_key(it) == self.batch_key(items[0]) for it in items)
        return self.stage.decode(torch.stack([it.inputs for it in items]), p.height, p.width, p.num_frames)

    def encode(self, item: StageItem) -> dict[str, torch.Tensor]:
        """An ``encode`` item's output: the text encoder's tensors and the encoded input image."""
        images = item.params.images
        if not images:
            raise RequestError("the encode of an edit takes its input images; this item has none")
        # the inputs are views of the previous stage's output, released before this output is published: copies
        out = {k: v.clone() for k, v in (item.inputs or {}).items()}
        for i, data in enumerate(images):  # one at a time, as the edit pipelines encode them
            out[condition_key_name(i)] = self.stage.encode_image(data)
        return out


ENGINES: dict[str, type[TextEncoderEngine] | type[DenoiserEngine] | type[VaeEngine]] = {
    "text_encoder": TextEncoderEngine, "denoiser": DenoiserEngine, "vae": VaeEngine}


def load_engine(stage: str, path: str | Path, dtype: str, device: str, mesh: Any = None, **options: Any) -> Engine:
    """Load the engine of ``stage`` (one of :data:`ENGINES`) on ``mesh`` (None: one process); ``options`` are the
    stage's own load options (the VAE's ``tiling``)."""
    return ENGINES[stage].load(path, dtype, device, mesh=mesh, **options)

