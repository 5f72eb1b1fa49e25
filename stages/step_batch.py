"""The running set of the denoiser: requests that join and leave between denoising steps.

A :class:`RunningSet` holds every request being denoised, each with its own state: its latents, its own
timestep/sigma schedule (its own step count and the shift of its own image size), its guidance and its number of
guidance branches. :meth:`RunningSet.step` advances every request by one of *its own* steps in one model forward
per join group (requests whose rows fit one tensor: same image size and text length): each (request, branch) pair
is one row of :meth:`DenoiserStage.forward_rows` (``parallel.strategies.row_forward``), with its own timestep,
guidance and embeddings, so requests with and without true CFG, and with different step counts, share a forward.
A request that has done its last step leaves the set and ``step`` returns its latents.

The request-level policy (a batch runs from its first to its last step) and the step-level policy (the runtime
admits and retires requests at every step boundary) both run this one loop, so a request's result depends on who
shared its steps only through the rounding of a batched matmul (latents rel <= 1e-4). With ``batch_invariant``
every request runs its own forward (all of its branches, as its solo run does), which makes it bit-identical to its
solo run at the cost of batching (docs/BENCHMARKS.md).

Mixed image sizes (``DenoiserStage.mixed_sizes``, ``[stages.denoiser] mixed_sizes``): the join key is then the text
length alone, and a join group may hold requests of different image sizes. Each row's image tokens are padded (with
zeros) to the longest row's, each row has its own ``img_ids`` (its own rotary positions) and a ``key_padding_mask``
that takes the padding out of attention as keys; the padding's outputs are discarded. Both are *row* arguments of
``forward_rows``, so CFG parallel splits them with the rows. :attr:`RunningSet.padding_waste` is the last step's
padded fraction of its image tokens (the admission policy keeps it under ``max_padding_waste``).

Every rank of a replica holds the same running set: the runtime broadcasts each admit/drop, and ``step`` retires
the finished requests on every rank alike.

Previews (streamed partial images): a request whose ``DenoiseRequest.previews`` names a step count keeps, after that
step, the model's predicted clean latent ``x0 = x_t - sigma_t * v`` of that step (flow matching: ``x_t = (1 - sigma)
x0 + sigma * noise`` and ``v = noise - x0``); :meth:`RunningSet.take_previews` hands them out. Nothing else of the
step changes, so the final latents are those of the same request without previews.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from omni_runtime.stages.block_cache import BlockCache, row_key
from omni_runtime.stages.cache_config import CacheStats
from omni_runtime.stages.guidance import Guidance, mixed_apply, mixed_rows
from omni_runtime.stages.latents import image_seq_len, initial_noise
from omni_runtime.stages.lora import ROW_ARG, SHARED_ARG, LoraAdapter
from omni_runtime.stages.schedule import euler_step

if TYPE_CHECKING:
    from omni_runtime.stages.denoiser import DenoiseRequest, DenoiserStage

logger = logging.getLogger(__name__)

__all__ = ["Running", "RunningSet", "padding_waste", "preview_steps"]


def preview_steps(steps: int, partials: int) -> tuple[int, ...]:
    """After which steps (step counts done, 1 .. steps - 1) a request of ``steps`` steps shows ``partials`` previews:
    evenly spaced, ``round(steps * (k + 1) / (partials + 1))``; fewer when the steps are too few (the last step's
    result is the final image, not a preview)."""
    out = sorted({round(steps * (k + 1) / (partials + 1)) for k in range(partials)})
    return tuple(s for s in out if 1 <= s < steps)


def padding_waste(row_tokens: list[int]) -> float:
    """The fraction of a forward's image tokens that are padding when rows of ``row_tokens`` image tokens each are
    padded to the longest: padded tokens / (rows x longest); 0 for no rows."""
    if not row_tokens:
        return 0.0
    longest = max(row_tokens)
    return sum(longest - t for t in row_tokens) / (longest * len(row_tokens))


@dataclass
class Running:
    """One request in the running set. ``branches`` holds one dict of the family's branch tensors per guidance
    branch (0 = conditional)."""

    id: int
    req: DenoiseRequest
    latents: torch.Tensor      # (1, tokens, C*4)
    timesteps: torch.Tensor    # (steps,)
    sigmas: torch.Tensor       # (steps + 1,)
    branches: list[dict[str, torch.Tensor]]
    guidance: Guidance
    img_ids: torch.Tensor      # (tokens, 3)
    key: Hashable
    done: int = 0              # steps done
    lora: list[tuple[LoraAdapter, float]] = field(default_factory=list)  # its adapters and their weights
    #: image edits: the condition tokens (1, tokens, C*4) and their position ids (tokens, 3) that follow the image
    #: tokens in the sequence (``ModelFamily.condition``); the prediction is sliced back to the image tokens
    cond: torch.Tensor | None = None
    cond_ids: torch.Tensor | None = None
    stepper: Any = None        # its own multistep solver (stages.schedule.DiffusersStepper); None: Euler
    #: the predicted clean latent (1, tokens, C*4) of the step just done when it is one of ``req.previews``
    preview: torch.Tensor | None = None

    @property
    def total(self) -> int:
        return self.req.num_inference_steps

    @property
    def rows(self) -> int:
        return len(self.branches)

    @property
    def tokens(self) -> int:
        return self.latents.shape[1]

    @property
    def length(self) -> int:
        """Its sequence in the forward: image tokens, then condition tokens."""
        return self.tokens + (self.cond.shape[1] if self.cond is not None else 0)

    @property
    def grid(self) -> Hashable:
        """Rows with equal grids have equal position ids."""
        return self.req.height, self.req.width, None if self.cond_ids is None else tuple(self.cond_ids.shape)

    def hidden(self) -> torch.Tensor:
        return self.latents if self.cond is None else torch.cat([self.latents, self.cond], dim=1)

    def ids(self) -> torch.Tensor:
        return self.img_ids if self.cond_ids is None else torch.cat([self.img_ids, self.cond_ids])


class RunningSet:
    """The requests being denoised on one rank, by id (an int the caller picks, unique while the request runs:
    the row strategies key per-request state by it)."""

    def __init__(self, stage: DenoiserStage, *, batch_invariant: bool = False) -> None:
        self.stage = stage
        self.batch_invariant = batch_invariant
        self.running: dict[int, Running] = {}
        #: padded image tokens / all image tokens of the last step's forwards (mixed sizes; else 0)
        self.padding_waste = 0.0
        #: every cached row's state (``stages.block_cache``), with the layout's sp and cfg groups
        mesh = stage.mesh
        self.cache = BlockCache(mesh.group("sp") if mesh.size("sp") > 1 else None,
                                mesh.group("cfg") if mesh.size("cfg") > 1 else None)
        #: the cache counters of the requests that finished in the last step, by id
        self.finished_cache: dict[int, CacheStats] = {}

    def __len__(self) -> int:
        return len(self.running)

    def __contains__(self, rid: object) -> bool:
        return rid in self.running

    def __iter__(self) -> Iterator[Running]:
        return iter(self.running.values())

    def join_key(self, req: DenoiseRequest) -> Hashable:
        """Requests with equal keys can share a forward (their rows stack): image size and text length."""
        return self.stage.join_key(req)

    def admit(self, rid: int, req: DenoiseRequest) -> None:
        """Add ``req`` as ``rid`` (validated here; a bad request raises before it joins). Its tensors are copied:
        the caller may release the inputs once every rank has admitted it."""
        if rid in self.running:
            raise ValueError(f"request id {rid} is already running")
        st = self.stage
        st.validate(req)
        h, w = req.height, req.width
        dev, dt = st.device, st.dtype
        branches = [{k: v.to(dev, dt, copy=True) for k, v in b.items()} for b in st.branches(req)]
        frames = st.frames(req)  # latent frames: 1 for an image
        timesteps, sigmas = st.schedule.sigmas(req.num_inference_steps,
                                               image_seq_len(h, w, st.vae_scale_factor) * frames, dev)
        stepper = st.schedule.new_stepper(req.num_inference_steps, dev)  # None: flow-match Euler
        if stepper is not None:
            timesteps = stepper.timesteps
        cond = st.condition(req)
        lora = st.lora.acquire(req.lora)  # pinned while it runs; a bad adapter raises before it joins
        self.running[rid] = Running(
            id=rid, req=req, lora=lora, stepper=stepper, cond=None if cond is None else cond[0][None].clone(),
            cond_ids=None if cond is None else cond[1],
            latents=initial_noise(req.seed, st.num_channels_latents, h, w, st.vae_scale_factor, dt, dev, frames),
            timesteps=timesteps, sigmas=sigmas, branches=branches, guidance=st.guidance(req),
            img_ids=st.family.latent_ids(frames, h, w, st.vae_scale_factor, dev, dt), key=self.join_key(req))
        if req.cache is not None and req.cache.enabled:
            for b in range(len(branches)):
                self.cache.admit(row_key(rid, b), req.cache, req.num_inference_steps)

    def _cache_keys(self, r: Running) -> list[int]:
        return [row_key(r.id, b) for b in range(r.rows)]

    def drop(self, rid: int) -> bool:
        """Take ``rid`` out (cancelled, expired); False if it is not running."""
        r = self.running.pop(rid, None)
        if r is not None:
            self.stage.lora.unpin([ad for ad, _ in r.lora])
            self.cache.forget(self._cache_keys(r))
        return r is not None

    def cache_stats(self, rid: int) -> CacheStats | None:
        """The cache counters of a request that finished in the last step, None if it ran uncached."""
        return self.finished_cache.get(rid)

    def progress(self, rid: int) -> tuple[int, int]:
        """(steps done, steps in all) of a running request."""
        r = self.running[rid]
        return r.done, r.total

    @torch.no_grad()
    def step(self) -> dict[int, torch.Tensor]:
        """One denoising step of every running request (each at its own step index). Returns the packed latents
        (tokens, C*4) of the requests that just did their last step; they have left the set."""
        self.finished_cache = {}
        groups: dict[Hashable, list[Running]] = {}
        for r in self.running.values():
            r.preview = None  # a preview nobody took (a follower rank) goes with the step it belongs to
            # rows at steps of different experts (stages.experts) run on their own expert: one forward each
            groups.setdefault((r.key, self.stage.expert_of(r.timesteps[r.done])), []).append(r)
        padded = total = 0
        for (_, expert), members in groups.items():
            if self.batch_invariant:  # one forward per request: the same shapes as its solo run
                for r in members:
                    self._advance([r], expert)
                total += sum(r.length * r.rows for r in members)
            else:
                self._advance(members, expert)
                longest = max(r.length for r in members)
                rows = sum(r.rows for r in members)
                padded += sum((longest - r.length) * r.rows for r in members)
                total += longest * rows
        self.padding_waste = padded / total if total else 0.0
        done = {}
        for rid, r in list(self.running.items()):
            if r.done >= r.total:
                r = self.running.pop(rid)
                self.stage.lora.unpin([ad for ad, _ in r.lora])
                stats = self.cache.stats(self._cache_keys(r))
                if stats is not None:
                    self.finished_cache[rid] = stats
                self.cache.forget(self._cache_keys(r))
                done[rid] = r.latents[0]
        return done

    def take_previews(self) -> dict[int, tuple[int, torch.Tensor]]:
        """The previews of the step just done: request id -> (steps done, predicted clean latents (tokens, C*4))."""
        out = {}
        for rid, r in self.running.items():
            if r.preview is not None:
                out[rid] = (r.done, r.preview[0])
                r.preview = None
        return out

    def _advance(self, members: list[Running], expert: int = 0) -> None:
        """One step of ``members`` (one join group, all at steps of expert ``expert``) in one forward of that
        expert, each request with its own guidance scale for it: rows branch-major, i.e. the conditional row of
        every request, then the second branch of every request with two, and so on."""
        st = self.stage
        guides = [r.guidance for r in members]
        info = mixed_rows([r.id for r in members], guides, [r.done for r in members])
        by_id = {r.id: r for r in members}
        rows = [(by_id[row.request], row.branch) for row in info]
        ts = torch.stack([r.timesteps[r.done] for r, _ in rows]).to(members[0].latents.dtype)
        guidance = None
        if st.guidance_embeds:
            guidance = torch.tensor([float(r.req.guidance_scale) for r, _ in rows], device=st.device,
                                    dtype=torch.float32)
        longest = max(r.length for r in members)
        row_args = {"timestep": ts / 1000, "guidance": guidance,
                    **st.family.row_args([r.branches[b] for r, b in rows])}
        first = members[0].req  # the text positions of the rows (a family with mixed sizes has size-free ones)
        shared = {"txt_ids": st.family.text_ids(row_args["encoder_hidden_states"].shape[1], first.height, first.width,
                                                st.vae_scale_factor, st.device, st.dtype)}
        if members[0].cond_ids is not None:  # one join group: equal condition shapes, equal condition ids
            shared["txt_ids"] = st.family.condition_text_ids(shared["txt_ids"], members[0].cond_ids)
        if len({r.grid for r in members}) == 1:  # one size: ids shared by every row
            row_args["hidden_states"] = torch.cat([r.hidden() for r, _ in rows])
            shared["img_ids"] = members[0].ids()
        else:  # mixed sizes: each row its own positions (equal token counts may still be other sizes)
            row_args["hidden_states"] = torch.stack([_pad(r.hidden()[0], longest) for r, _ in rows])
            row_args["img_ids"] = torch.stack([_pad(r.ids(), longest) for r, _ in rows])
            if any(r.length < longest for r in members):  # pad to the longest, padding masked out of attention
                mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=st.device)
                for j, (r, _) in enumerate(rows):
                    mask[j, :r.length] = True
                row_args["key_padding_mask"] = mask
        if any(r.lora for r in members):  # per-row adapters: a row argument, split with the rows
            row_args[ROW_ARG], shared[SHARED_ARG] = _lora_rows(rows, st.device)
        keys = [row_key(r.id, b) for r, b in rows]
        cached = any(k in self.cache.rows for k in keys)
        if cached:  # the rows' keys split with the rows (CFG parallel), the cache shared
            row_args["cache_rows"], shared["block_cache"] = torch.tensor(keys, dtype=torch.int64), self.cache
            self.cache.before_step(keys, info)
        pred = st.forward_rows(st.models[expert], row_args, shared, info)
        if cached:
            self.cache.finish_step(keys, st.cache_blocks)
        velocity = mixed_apply(pred, info, [r.id for r in members], guides,
                               [r.req.expert_scales(expert) for r in members])
        for j, r in enumerate(members):
            v = velocity[j:j + 1, :r.tokens]  # padding and condition tokens' outputs are discarded
            if r.done + 1 in r.req.previews:  # x0 = x_t - sigma_t * v, in fp32 as the Euler step
                r.preview = (r.latents.to(torch.float32) - r.sigmas[r.done] * v).to(v.dtype)
            if r.stepper is not None:
                r.latents = r.stepper.step(v, r.timesteps[r.done], r.latents)
            else:
                r.latents = euler_step(r.latents, v, r.sigmas[r.done], r.sigmas[r.done + 1])
            r.done += 1


def _lora_rows(rows: list[tuple[Running, int]], device: torch.device) -> tuple[torch.Tensor, list[LoraAdapter]]:
    """The step's adapters (each once, in order of first use) and each row's weight of each: (rows, adapters);
    every branch of a request has the request's adapters (diffusers adapts the one transformer of all branches)."""
    adapters: list[LoraAdapter] = []
    col: dict[int, int] = {}
    for r, _ in rows:
        for ad, _ in r.lora:
            if id(ad) not in col:
                col[id(ad)] = len(adapters)
                adapters.append(ad)
    scales = torch.zeros(len(rows), len(adapters), dtype=torch.float32)
    for j, (r, _) in enumerate(rows):
        for ad, w in r.lora:
            scales[j, col[id(ad)]] += w
    return scales.to(device), adapters


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` (tokens, ...) with zero rows appended up to ``length`` tokens."""
    if t.shape[0] == length:
        return t
    return torch.cat([t, t.new_zeros(length - t.shape[0], *t.shape[1:])])
