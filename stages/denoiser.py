"""Denoiser stage: the flow-matching loop over a batch of requests, for any model family.

For each request it draws the initial latents from ``torch.Generator("cpu").manual_seed(seed)`` as diffusers'
pipelines (FluxPipeline, QwenImagePipeline) do, runs the flow-match Euler schedule of the checkpoint (``shift`` /
dynamic shifting), feeds the guidance embedding when the model has one and applies the family's true CFG when a
request has negative embeddings and ``true_cfg_scale > 1``. What differs between families (the conditioning
tensors, position ids, the guidance combine) comes from the family's declaration (``stages.models.family``). Requests of the same shape run in one forward; every request has its own generator, so
batching does not change any result.

The stage knows nothing about processes. It loads on a :class:`parallel.mesh.Mesh` (``mesh=None``: one process).
Under sequence parallelism (an sp group of more than one rank) every rank runs this same loop on the same inputs;
``SequenceParallel(mesh).apply(model)`` at load binds the mesh into the attention layers and installs the
``_sp_plan`` hooks, which split the image tokens across ranks and gather the output.

Request fields are validated once, at the API edge (``runtime.requests``); this stage only asserts what it relies
on. What it checks itself is what depends on the model: the image size against the VAE scale factor and the
embedding widths. A ``stop`` hook, asked before every step, lets a caller take requests out of a running batch
(cancelled or expired); the others go on unchanged.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from omni_runtime.parallel.group_coordinator import GroupCoordinator
from omni_runtime.parallel.hsdp import HSDPInferenceConfig
from omni_runtime.parallel.mesh import Mesh
from omni_runtime.parallel.strategies import SequenceParallel
from omni_runtime.parallel.strategies.row_forward import RowForward, row_forward_for
from omni_runtime.stages.block_cache import UNSUPPORTED_LAYOUT, CachePlan
from omni_runtime.stages.cache_config import CacheConfig
from omni_runtime.stages.compile import PIPEFUSION, REFUSED_LAYOUTS, CompileLog, compile_blocks
from omni_runtime.stages.cpu_linear import CPU_LINEAR, use_onednn
from omni_runtime.stages.device import resolve_device, resolve_dtype
from omni_runtime.stages.errors import CheckpointError, RequestError
from omni_runtime.stages.experts import ONE_EXPERT, ExpertSchedule
from omni_runtime.stages.guidance import UNGUIDED, Guidance
from omni_runtime.stages.latents import (
    check_image_size,
    image_seq_len,
    latent_frames,
    unpack_latents,
    unpack_video_latents,
)
from omni_runtime.stages.lora import LoraBank, LoraSpec
from omni_runtime.stages.models.family import CONDITION_KEY, ModelFamily, condition_keys, family_of
from omni_runtime.stages.schedule import FlowMatchSchedule
from omni_runtime.stages.step_batch import RunningSet
from omni_runtime.stages.weights import component_dir, read_config

logger = logging.getLogger(__name__)

#: Asked before denoising step ``i`` (``stop(i)``): the indices (into the requests passed to ``denoise``) to take
#: out of the batch now. Every rank of a replica must get the same answer.
StopHook = Callable[[int], Sequence[int]]


@dataclass
class DenoiseRequest:
    """One image to denoise. ``embeds`` is the text encoder's output for its prompt: the family's branch tensors
    (:attr:`stages.models.family.ModelFamily.branch_dims`, e.g. Flux's ``prompt_embeds`` (seq, d) and
    ``pooled_prompt_embeds`` (d_pooled,); a leading batch dim of 1 is dropped) and, for true CFG, the negative
    prompt's under the same keys prefixed ``negative_``."""

    embeds: dict[str, torch.Tensor]
    seed: int = 0
    height: int = 1024
    width: int = 1024
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    true_cfg_scale: float = 1.0
    #: the request's LoRA adapters (``stages.lora``), combined as diffusers' ``set_adapters(names, weights)``
    lora: tuple[LoraSpec, ...] = ()
    #: the request's cache acceleration (``stages.block_cache``); None or method "none": every block every step
    cache: CacheConfig | None = None
    #: frames of a video (a family with ``video``); 1 for an image
    num_frames: int = 1
    #: after which steps (steps done) to keep the predicted clean latent for a preview (``stages.step_batch``)
    previews: tuple[int, ...] = ()

    @property
    def do_true_cfg(self) -> bool:
        """The pipelines' rule: true CFG runs when ``true_cfg_scale > 1`` and a negative prompt is given."""
        return self.true_cfg_scale > 1 and any(k.startswith(NEGATIVE) for k in self.embeds)

    #: the true-CFG scale of the steps the second expert denoises (two-expert checkpoints, ``stages.experts``;
    #: diffusers' ``guidance_scale_2``); None: ``true_cfg_scale``
    true_cfg_scale_2: float | None = None

    @property
    def guidance_scales(self) -> tuple[float, ...]:
        """The scales the request's guidance combine takes (the first expert's steps)."""
        return self.expert_scales(0)

    def expert_scales(self, expert: int) -> tuple[float, ...]:
        """The scales of the guidance combine of a step expert ``expert`` denoises."""
        if not self.do_true_cfg:
            return ()
        if expert > 0 and self.true_cfg_scale_2 is not None:
            return (self.true_cfg_scale_2,)
        return (self.true_cfg_scale,)


#: the prefix of a negative prompt's tensors in :attr:`DenoiseRequest.embeds`
NEGATIVE = "negative_"


def temporal_factor_of(path: str | Path, family: ModelFamily) -> int:
    """Pixel frames per latent frame of the model's VAE (1: an image VAE, or no ``vae/``)."""
    vae_dir = Path(path) / "vae"
    return family.vae.temporal_factor(read_config(vae_dir)) if vae_dir.is_dir() else 1


def vae_scale_factor_of(path: str | Path, family: ModelFamily) -> int:
    """Pixels per latent row of the model's VAE, as its pipeline computes it (8 when the model has no ``vae/``)."""
    vae_dir = Path(path) / "vae"
    if not vae_dir.is_dir():
        return 8
    return family.vae.scale_factor(read_config(vae_dir))


def check_expert_configs(path: str | Path, slots: Sequence[str]) -> None:
    """The experts of one checkpoint take the same inputs and split the same way (pp, sp): their configs must be
    equal (keys starting with ``_`` aside); a :class:`CheckpointError` names the keys that differ."""
    configs = [{k: v for k, v in read_config(component_dir(path, slot)).items() if not k.startswith("_")}
               for slot in slots]
    for slot, config in zip(slots[1:], configs[1:], strict=True):
        differ = sorted(k for k in set(config) | set(configs[0]) if config.get(k) != configs[0].get(k))
        if differ:
            raise CheckpointError(f"{Path(path) / slot}/config.json differs from {slots[0]}/config.json in "
                                  f"{differ}; the experts of one checkpoint must have equal configs")


def _unbatched(t: object, field: str, ndim: int) -> torch.Tensor:
    """``t`` with ``ndim`` dims, or with a leading batch dim of 1 that is dropped; anything else names the field."""
    if not isinstance(t, torch.Tensor):
        raise RequestError(f"{field} is a {type(t).__name__}; expected a tensor")
    if t.dim() == ndim + 1 and t.shape[0] == 1:
        return t[0]
    if t.dim() != ndim:
        shape = ("seq", "dim")[2 - ndim:] if ndim <= 2 else tuple(f"d{i}" for i in range(ndim))
        one = f"({', '.join(shape)}{',' if ndim == 1 else ''})"
        raise RequestError(f"{field} has shape {tuple(t.shape)}; expected {one} or (1, {', '.join(shape)})")
    return t


class DenoiserStage:
    """Runs the denoising loop of a model family's transformer. ``denoise(requests)`` returns one latent per
    request. What depends on the family (its conditioning rows, position ids, guidance) is read from ``family``."""

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], schedule: FlowMatchSchedule,
                 vae_scale_factor: int, dtype: torch.dtype, device: torch.device, mesh: Mesh | None = None,
                 *, family: ModelFamily, batch_invariant: bool = False, mixed_sizes: bool = False,
                 lora_max_loaded: int = 8, experts: Sequence[torch.nn.Module] = (),
                 expert_schedule: ExpertSchedule = ONE_EXPERT) -> None:
        self.model = model
        #: the transformers of the checkpoint in schedule order (``stages.experts``; ``models[0] is model``)
        self.models: list[torch.nn.Module] = list(experts) or [model]
        self.expert_schedule = expert_schedule
        if len(self.models) != expert_schedule.experts:
            raise ValueError(f"{len(self.models)} expert model(s) for the schedule {expert_schedule}")
        self.family = family
        self.mesh = mesh if mesh is not None else Mesh.single(device)
        if mixed_sizes and (self.mesh.size("sp") > 1 or self.mesh.size("pp") > 1):
            raise ValueError(f"mixed_sizes needs sp = pp = 1 (the padded rows are not split over ranks); this mesh "
                             f"has sp = {self.mesh.size('sp')}, pp = {self.mesh.size('pp')}")
        if mixed_sizes and not family.mixed_sizes:
            raise ValueError(f"mixed_sizes is not supported by the {family.name} family: "
                             f"{family.unsupported.get('mixed_sizes', 'its rows cannot share a forward')}")
        self.config = config
        self.schedule = schedule
        self.vae_scale_factor = vae_scale_factor
        self.dtype = dtype
        self.device = device
        self.in_channels = int(config.get("in_channels", 64))
        self.num_channels_latents = family.latent_channels(config)
        #: pixel frames per latent frame (a video family's VAE; 1 for images)
        self.temporal_factor = 1
        self.guidance_embeds = bool(config.get("guidance_embeds", False))
        #: how one step's rows are computed on this mesh (``parallel.strategies.row_forward``)
        self.forward_rows: RowForward = row_forward_for(self.mesh)
        #: one forward per request (bit-identical to its solo run) instead of one per join group
        self.batch_invariant = batch_invariant
        #: requests of different image sizes share a step's forward (padded and masked, ``stages.step_batch``)
        self.mixed_sizes = mixed_sizes
        #: this rank's LoRA adapters and the hooks that apply them per row (``stages.lora``)
        self.lora = LoraBank(model, dtype, device, max_loaded=lora_max_loaded,
                             pipeline=family.pipeline_classes[0] if family.pipeline_classes else None)
        self._request_ids = itertools.count(1 << 40)  # request-level batches (step-level slots count from 0)
        #: ``[stages.denoiser] compile``: the log of the graphs compiled here (``stages.compile``); None: eager
        self.compile_log: CompileLog | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", mesh: Mesh | None = None,
                        ep_group: GroupCoordinator | None = None,
                        hsdp: HSDPInferenceConfig | None = None, batch_invariant: bool = False,
                        mixed_sizes: bool = False, cpu_linear: str = "onednn",
                        lora_max_loaded: int = 8, compile: bool = False) -> DenoiserStage:
        """Load the family's transformer + the scheduler config on ``mesh`` (None: ``Mesh.single()``); with an sp
        group of more than one rank, apply :class:`SequenceParallel` to the model.

        ``ep_group``: the expert-parallel group with its all2all manager attached
        (``parallel.all2all.init_expert_parallel(mesh)``); an MoE model then holds and loads only this rank's
        experts, and the manager sizes its buffers from the model. ``hsdp`` (shard degree > 1, e.g.
        ``parallel.hsdp.hsdp_config_from_mesh(mesh)``): the weights are sharded (FSDP2) and loaded shard by shard.
        ``cpu_linear``: ``"onednn"`` runs a float32 CPU model's linear layers on oneDNN (``stages.cpu_linear``;
        not with HSDP, whose sharded weights were not measured there), ``"torch"`` on torch's own kernel.
        ``lora_max_loaded``: LoRA adapters kept loaded on this rank (``stages.lora``, ``[lora] max_loaded``).
        ``compile``: ``torch.compile`` the transformer's blocks (``stages.compile``; not under PipeFusion)."""
        if cpu_linear not in CPU_LINEAR:
            raise ValueError(f"cpu_linear = {cpu_linear!r}: allowed values are {CPU_LINEAR}")
        torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
        mesh = mesh if mesh is not None else Mesh.single(dev)
        family = family_of(path)
        config = read_config(component_dir(path, "transformer"))
        schedule = FlowMatchSchedule.from_pretrained(path, multistep=family.scheduler_timesteps)
        if family.scheduler_timesteps:
            schedule = dataclasses.replace(schedule, scheduler_timesteps=True)
        experts = family.expert_schedule(Path(path))
        check_expert_configs(path, experts.slots)
        models = [cls._load_expert(path, slot, family, torch_dtype, dev, mesh, ep_group, hsdp, cpu_linear)
                  for slot in experts.slots]
        logger.info("loaded %s denoiser from %s (%s on %s)%s", family.name, path, torch_dtype, dev,
                    f"; {experts.experts} experts {list(experts.slots)}, boundary timestep {experts.boundary:g}"
                    if experts.experts > 1 else "")
        stage = cls(models[0], config, schedule, vae_scale_factor_of(path, family), torch_dtype, dev, mesh,
                    family=family, batch_invariant=batch_invariant, mixed_sizes=mixed_sizes,
                    lora_max_loaded=lora_max_loaded, experts=models, expert_schedule=experts)
        stage.temporal_factor = temporal_factor_of(path, family)
        if compile:
            if mesh.size("pp") > 1 and mesh.spec.pp_mode == "pipefusion":
                raise ValueError(f"compile with pp_mode = 'pipefusion': {REFUSED_LAYOUTS[PIPEFUSION]}")
            stage.compile_log = compile_blocks(models, eager_attention=mesh.size("sp") > 1)
        if mesh.size("cfg") > 1:
            logger.info("denoiser: CFG parallel over %d ranks (cfg rank %d), rows by %r", mesh.size("cfg"),
                        mesh.rank("cfg"), stage.forward_rows)
        return stage

    @staticmethod
    def _load_expert(path: str | Path, slot: str, family: ModelFamily, torch_dtype: torch.dtype,
                     dev: torch.device, mesh: Mesh, ep_group: GroupCoordinator | None,
                     hsdp: HSDPInferenceConfig | None, cpu_linear: str) -> torch.nn.Module:
        """One transformer of the checkpoint (``slot``: its ``model_index.json`` component), loaded, sharded and
        hooked for the layout: every expert the same way."""
        pp = mesh.size("pp")
        model = family.load_transformer(component_dir(path, slot), torch_dtype, dev, ep_group=ep_group,
                                        hsdp=hsdp, pp_group=mesh.group("pp") if pp > 1 else None)
        if ep_group is not None and ep_group.device_communicator is not None:
            ep_group.device_communicator.prepare_communication_buffer_for_model(model)
            experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
            logger.info("denoiser: expert parallel rank %d/%d, %d expert parameters of %d in all",
                        ep_group.rank_in_group, ep_group.world_size, experts,
                        sum(p.numel() for p in model.parameters()))
        if cpu_linear == "onednn" and not (hsdp is not None and hsdp.enabled):
            n = use_onednn(model, torch_dtype, dev)
            if n:
                logger.info("denoiser: %d linear layers on oneDNN (cpu_linear = 'onednn')", n)
        sp = mesh.size("sp")
        if sp > 1:  # a pipeline stage without the head gathers nothing: its activations go on sharded
            SequenceParallel(mesh, check_gathers=pp == 1 or mesh.rank("pp") == pp - 1).apply(model)
            logger.info("denoiser: sequence parallel over %d ranks", sp)
        return model

    def guidance(self, req: DenoiseRequest) -> Guidance:
        """The request's branches and their combine: the family's true CFG (cond, uncond) when the request runs
        it, else :data:`stages.guidance.UNGUIDED`."""
        return self.family.true_cfg if req.do_true_cfg else UNGUIDED

    def branches(self, req: DenoiseRequest) -> list[dict[str, torch.Tensor]]:
        """The request's branch tensors, unbatched: the prompt's, then (true CFG) the negative prompt's."""
        prefixes = ["", NEGATIVE] if req.do_true_cfg else [""]
        out = []
        for prefix in prefixes:
            branch = {}
            for key, ndim in self.family.branch_dims.items():
                name = prefix + key
                if name not in req.embeds:
                    raise RequestError(f"{name} is missing; the {self.family.name} family takes "
                                       f"{[prefix + k for k in self.family.branch_dims]}")
                branch[key] = _unbatched(req.embeds[name], name, ndim)
            out.append(branch)
        return out

    def validate(self, req: DenoiseRequest) -> None:
        """Raise :class:`RequestError` naming the field for what this model cannot run (image size, embeddings).
        The numbers of a request (steps, seed, guidance) were validated at the API edge; they are only asserted."""
        assert isinstance(req.num_inference_steps, int) and req.num_inference_steps >= 1, req.num_inference_steps
        assert isinstance(req.seed, int) and req.seed >= 0, req.seed
        check_image_size(req.height, req.width, 2 * self.vae_scale_factor)
        self.check_frames(req.num_frames)
        spec = self.mesh.spec
        if spec.pp > 1 and spec.pp_mode == "pipefusion":  # PipeFusion's patches are whole token rows
            patches, rows = spec.pipefusion_patches or spec.pp, req.height // (2 * self.vae_scale_factor)
            if patches > rows:
                raise RequestError(f"height={req.height}: {req.height} / {2 * self.vae_scale_factor} = {rows} token "
                                   f"row(s) < stages.denoiser.parallel.pipefusion_patches = {patches} (0: pp = "
                                   f"{spec.pp}); allowed: height >= {patches * 2 * self.vae_scale_factor}")
        self._check_experts(req)
        if req.cache is not None and req.cache.enabled:
            self._check_cache(req.cache)
        cond = self.condition(req)
        if cond is not None:
            if cond[0].shape[-1] != self.in_channels:
                raise RequestError(f"{CONDITION_KEY} packs to width {cond[0].shape[-1]}; this model takes "
                                   f"{self.in_channels}")
            if spec.pp > 1 and spec.pp_mode == "pipefusion":
                raise RequestError("an edit's condition tokens cannot run under PipeFusion (its patches are rows "
                                   "of the output image); allowed: pp_mode = 'layer'")
        branches = self.branches(req)
        for prefix, branch in zip(["", NEGATIVE], branches, strict=False):
            self.family.check_branch(branch, self.config, prefix)
        self.family.check_branches(branches)

    def _check_experts(self, req: DenoiseRequest) -> None:
        """What a request cannot ask of this checkpoint's experts (``stages.experts``), naming the field."""
        if len(self.models) == 1:
            if req.true_cfg_scale_2 is not None:
                raise RequestError("guidance_scale_2: only two-expert (Wan 2.2, boundary_ratio) models use it; this "
                                   "model has one transformer; allowed: absent")
            return
        if req.lora:
            raise RequestError(f"lora: per-request LoRA adapters are not served for a checkpoint with "
                               f"{len(self.models)} experts ({', '.join(self.expert_schedule.slots)}; diffusers "
                               f"loads an adapter into each expert separately); allowed: no lora")
        if req.cache is not None and req.cache.enabled:
            raise RequestError(f"cache.method={req.cache.method!r}: cache acceleration is not served for a "
                               f"checkpoint with {len(self.models)} experts (a cached residual of one expert is no "
                               f"estimate for the other); allowed: method 'none'")

    def expert_of(self, timestep: torch.Tensor | float) -> int:
        """The index into :attr:`models` of the expert that denoises a step at ``timestep``."""
        return self.expert_schedule.expert(float(timestep))

    @property
    def cache_blocks(self) -> int:
        """The number of blocks the model's cache plan runs (0: the family declares none)."""
        plan = getattr(self.model, "_cache_plan", None)
        return len(plan.block_list(self.model)) if isinstance(plan, CachePlan) else 0

    def _check_cache(self, cache: CacheConfig) -> None:
        """What this model and layout cannot cache, as a :class:`RequestError` naming the field."""
        if self.mesh.size("pp") > 1:
            raise RequestError(f"cache.method={cache.method!r} is not supported under {UNSUPPORTED_LAYOUT}; "
                               f"allowed on this replica: method 'none'")
        n = self.cache_blocks
        if not n:
            raise RequestError(f"cache.method={cache.method!r}: the {self.family.name} family declares no cache "
                               f"plan; allowed: method 'none'")
        if cache.method == "teacache" and self.mesh.spec.hsdp_shard > 1:
            raise RequestError("cache.method='teacache' is not supported with HSDP (hsdp_shard > 1: the first "
                               "block's modulation weights are sharded outside its forward); allowed: first_block, "
                               "dbcache, none")
        if cache.method == "teacache" and not self.model._cache_plan.teacache:
            why = self.family.cache_refusals.get("teacache", "has no published TeaCache coefficients")
            raise RequestError(f"cache.method='teacache': the {self.family.name} family {why}; allowed: "
                               f"first_block, dbcache, none")
        if cache.fn + cache.bn >= n:
            raise RequestError(f"cache.fn + cache.bn = {cache.fn} + {cache.bn} = {cache.fn + cache.bn}: must be "
                               f"less than the model's {n} blocks (something has to be cached)")

    def condition(self, req: DenoiseRequest) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The request's condition tokens and their position ids (image edits; ``ModelFamily.condition``)."""
        return self.family.condition(req.embeds, self.vae_scale_factor, self.device, self.dtype)

    @staticmethod
    def condition_key(req: DenoiseRequest) -> tuple:
        """The shapes of the encoded input images (rows with equal ones have equal condition ids); () without."""
        return tuple(tuple(req.embeds[k].shape) for k in condition_keys(req.embeds))

    def check_frames(self, num_frames: int) -> None:
        """Raise :class:`RequestError` naming ``num_frames`` unless this model makes that many frames."""
        tf = self.temporal_factor
        if not self.family.video:
            if num_frames != 1:
                raise RequestError(f"num_frames={num_frames}: the {self.family.name} family makes images; allowed: 1")
        elif isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 \
                or (num_frames - 1) % tf:
            raise RequestError(f"num_frames={num_frames!r}: this video model takes {tf} k + 1 frames (1, {tf + 1}, "
                               f"{2 * tf + 1}, ...)")

    def frames(self, req: DenoiseRequest) -> int:
        """Latent frames of ``req`` (1 for an image)."""
        return latent_frames(req.num_frames, self.temporal_factor)

    def batch_key(self, req: DenoiseRequest) -> tuple:
        """Requests with equal keys run in one forward."""
        return (req.height, req.width, req.num_frames, req.num_inference_steps,
                self.family.join_key(self.branches(req)), req.do_true_cfg, self.condition_key(req))

    @torch.no_grad()
    def denoise(self, requests: list[DenoiseRequest], *, unpack: bool = False, progress: bool = False,
                stop: StopHook | None = None) -> list[torch.Tensor | None]:
        """Denoise every request; returns, in order, packed latents (tokens, C*4) per request, or unpacked
        (C, H/8, W/8) with ``unpack=True``. A request that ``stop`` took out of the batch gets ``None``."""
        for req in requests:
            self.validate(req)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(self.batch_key(req), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(requests)
        for idx in groups.values():
            group = [requests[i] for i in idx]
            local_stop = None
            if stop is not None:
                def local_stop(step: int, idx: list[int] = idx) -> list[int]:
                    return [idx.index(g) for g in stop(step) if g in idx]
            latents, kept = self._denoise_group(group, progress=progress, stop=local_stop)
            if latents is None:
                continue
            if unpack:
                g = group[0]
                latents = (unpack_video_latents(latents, self.frames(g), g.height, g.width, self.vae_scale_factor)
                           if self.family.video else unpack_latents(latents, g.height, g.width,
                                                                     self.vae_scale_factor))
            for j, k in enumerate(kept):
                out[idx[k]] = latents[j]
        return out

    __call__ = denoise

    def _denoise_group(self, reqs: list[DenoiseRequest], *, progress: bool,
                       stop: StopHook | None = None) -> tuple[torch.Tensor | None, list[int]]:
        """The loop for requests of one batch key (the request-level policy: the batch runs from its first step to
        its last over a :class:`~stages.step_batch.RunningSet`); returns the latents of the requests still in the
        batch at the end and their indices in ``reqs`` (all of them unless ``stop`` took some out; ``None`` if it
        took all)."""
        running = RunningSet(self, batch_invariant=self.batch_invariant)
        # ids unique over this stage's life (row strategies key per-request state by them); every rank of a
        # replica runs the same batches, so they agree
        ids = [next(self._request_ids) for _ in reqs]
        for rid, req in zip(ids, reqs, strict=True):
            running.admit(rid, req)
        out: dict[int, torch.Tensor] = {}
        steps = max(r.num_inference_steps for r in reqs)
        for i in tqdm(range(steps), disable=not progress, desc="denoise", leave=False):
            if stop is not None:
                drop = [k for k in stop(i) if 0 <= k < len(ids) and running.drop(ids[k])]
                if drop:
                    logger.debug("step %d: %d request(s) left the batch, %d go on", i, len(drop), len(running))
            if not running:
                break
            out.update(running.step())
        kept = [k for k, rid in enumerate(ids) if rid in out]
        return (torch.stack([out[ids[k]] for k in kept]) if kept else None), kept

    def join_key(self, req: DenoiseRequest) -> tuple:
        """Requests with equal keys can share one forward whatever their step counts and CFG: their rows stack
        (same image size and the family's join key, e.g. Flux's text length; with :attr:`mixed_sizes` the family's
        key alone: the image tokens are padded)."""
        key = self.family.join_key(self.branches(req))
        return (key,) if self.mixed_sizes else (req.height, req.width, req.num_frames, key, self.condition_key(req))

    def row_tokens(self, req: DenoiseRequest) -> tuple[int, int]:
        """(image tokens of one row, rows) of ``req`` in a step's forward: what its padding waste is counted by."""
        cond = self.condition(req)
        extra = cond[0].shape[0] if cond is not None else 0
        return (image_seq_len(req.height, req.width, self.vae_scale_factor) * self.frames(req) + extra,
                2 if req.do_true_cfg else 1)
