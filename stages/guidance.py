"""Guidance: how many branches one request runs per denoising step, and how their predictions combine.

A :class:`Guidance` is a small declaration: ``branches`` (N >= 1) and ``combine``, a function of one request's N
predictions and its scales. The denoising loop (``stages.step_batch``) runs one row per (request, branch) through the
row strategy of ``parallel.strategies.row_forward`` (:func:`mixed_rows`: requests of different guidance share one
forward) and combines each request's predictions with its guidance (:func:`mixed_apply`). How the rows are computed (one forward, CFG parallel over N ranks, a pipeline) is the
row strategy's business, not this file's.
A step whose requests have different guidance (continuous batching) uses :func:`mixed_rows` / :func:`mixed_apply`.

Instances:

* :data:`UNGUIDED`: one branch, the prediction as it is;
* :data:`TRUE_CFG`: FluxPipeline's true CFG, branches (conditional, unconditional),
  ``uncond + scale * (cond - uncond)``;
* :func:`composable_guidance` ``(n)``: n - 1 conditional branches and the unconditional one last,
  ``uncond + sum_k scale_k * (cond_k - uncond)`` (composable diffusion; n = 2 is true CFG);
* :data:`TRUE_CFG_NORM`: true CFG whose result is rescaled to the conditional prediction's norm per token
  (``comb * |cond| / |comb|`` over the channels), as QwenImagePipeline applies it;
* :data:`TEXT_IMAGE_GUIDANCE`: InstructPix2Pix's 3 branches (text + image, image only, unconditional),
  ``uncond + s_image * (image - uncond) + s_text * (text_image - image)``, scales ``(s_text, s_image)``.

Every combine works row by row with each request's scales as Python numbers (as diffusers applies them), so a batch
mixing scales rounds each request as its single run does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from omni_runtime.parallel.strategies.row_forward import RowInfo

logger = logging.getLogger(__name__)

__all__ = ["TEXT_IMAGE_GUIDANCE", "TRUE_CFG", "TRUE_CFG_NORM", "UNGUIDED", "Combine", "Guidance", "composable_guidance", "mixed_apply",
           "mixed_rows"]

#: ``combine(preds, scales) -> prediction``: one request's N branch predictions (each without a batch dim, in
#: branch order) and its scales, to the one prediction the scheduler steps with.
Combine = Callable[[Sequence[torch.Tensor], Sequence[float]], torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    """``branches`` predictions per request and step, combined by ``combine``; ``scales`` names the scales a
    request gives ``combine`` (documentation and error messages)."""

    name: str
    branches: int
    combine: Combine
    scales: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.branches < 1:
            raise ValueError(f"guidance {self.name!r}: branches = {self.branches}; must be >= 1")


def mixed_rows(requests: Sequence[int], guides: Sequence[Guidance], steps: Sequence[int]) -> list[RowInfo]:
    """The rows of a step whose requests may have different guidance (``guides[j]`` for ``requests[j]``, which is
    at its own denoising step ``steps[j]``): branch-major, branch ``k`` of every request that has it.
    ``[requests.index(row.request) for row in rows]`` maps each row to its request's inputs."""
    most = max((g.branches for g in guides), default=0)
    return [RowInfo(request=r, branch=k, branches=g.branches, step=i)
            for k in range(most) for r, g, i in zip(requests, guides, steps, strict=True) if k < g.branches]


def mixed_apply(pred: torch.Tensor, rows: Sequence[RowInfo], requests: Sequence[int], guides: Sequence[Guidance],
                scales: Sequence[Sequence[float]]) -> torch.Tensor:
    """The combined prediction of each of ``requests`` (in order) from ``pred`` (one row per entry of ``rows``, any
    order), each with its own guidance and scales."""
    where = {(row.request, row.branch): j for j, row in enumerate(rows)}
    if len(where) != len(rows) or pred.shape[0] != len(rows):
        raise ValueError(f"mixed guidance: {pred.shape[0]} prediction rows for {len(rows)} rows "
                         f"({len(where)} distinct (request, branch) pairs)")
    out = []
    for r, g, s in zip(requests, guides, scales, strict=True):
        preds = [pred[where[(r, k)]] for k in range(g.branches)]
        out.append(preds[0] if g.branches == 1 else g.combine(preds, s))
    return torch.stack(out)


def _unguided(preds: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    return preds[0]


def _composable(preds: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    *conds, uncond = preds
    if len(scales) != len(conds):
        raise ValueError(f"composable guidance: {len(scales)} scale(s) for {len(conds)} conditional branch(es)")
    out = uncond
    for cond, s in zip(conds, scales, strict=True):
        out = out + float(s) * (cond - uncond)
    return out


def _composable_norm(preds: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    comb = _composable(preds, scales)
    return comb * (torch.norm(preds[0], dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def _text_image(preds: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    text_image, image, uncond = preds
    s_text, s_image = (float(s) for s in scales)
    return uncond + s_image * (image - uncond) + s_text * (text_image - image)


UNGUIDED = Guidance("none", 1, _unguided)
#: FluxPipeline's true CFG (``uncond + true_cfg_scale * (cond - uncond)``); branches (cond, uncond)
TRUE_CFG = Guidance("true_cfg", 2, _composable, ("true_cfg_scale",))
#: QwenImagePipeline's true CFG: the combined prediction rescaled per token to the conditional one's norm
TRUE_CFG_NORM = Guidance("true_cfg_norm", 2, _composable_norm, ("true_cfg_scale",))
TEXT_IMAGE_GUIDANCE = Guidance("text_image", 3, _text_image, ("text_scale", "image_scale"))


def composable_guidance(branches: int) -> Guidance:
    """``branches - 1`` conditional branches and the unconditional one last, each with its scale."""
    if branches < 2:
        raise ValueError(f"composable guidance: branches = {branches}; must be >= 2")
    return Guidance(f"composable{branches}", branches, _composable,
                    tuple(f"scale_{k}" for k in range(branches - 1)))
