"""The denoiser's one model forward per step, as a strategy over *rows*.

A denoising step asks the transformer for a noise prediction for a set of rows. A row is one branch of one request:
the conditional branch, the unconditional one under true CFG, or further branches of multi-branch guidance. The
denoiser loop builds the rows (``rows``: tensors whose first dimension is the row), the arguments all rows share
(``shared``: e.g. ``txt_ids`` / ``img_ids``) and a description of each row (:class:`RowInfo`), then calls one
:class:`RowForward`, which returns the prediction of every row, in order, on every rank of the replica.

How the rows are computed is the parallel strategy's business, not the loop's:

* :class:`LocalForward` runs them in one forward of the local model (one process, or sequence parallel, whose
  hooks live inside the model);
* CFG parallel (:class:`parallel.strategies.cfg_parallel.CFGParallel`) spreads the rows over the cfg group and
  gathers the predictions; pipeline parallel sends them through the pp ranks in micro-batches. Each is one
  strategy file that implements :class:`RowForward`; an outer one hands its share of the rows to an inner one.

:func:`row_forward_for` picks the strategy from the mesh's degrees.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from omni_runtime.parallel.strategies.cfg_parallel import CFGParallel

logger = logging.getLogger(__name__)

__all__ = ["LocalForward", "RowForward", "RowInfo", "model_output", "row_forward_for"]


@dataclass(frozen=True)
class RowInfo:
    """What one row is: request ``request`` (an id unique while the request runs), branch ``branch`` of
    ``branches`` (0 = conditional), at denoising step ``step``. Strategies that keep state per request across steps
    (PipeFusion's stale K/V) key it by ``request``; the others only count rows."""

    request: int
    branch: int = 0
    branches: int = 1
    step: int = 0


class RowForward(Protocol):
    """``forward(model, rows, shared, info) -> prediction``: the prediction for every row (first dim = rows), on
    every rank of the replica. ``rows`` maps the model's keyword arguments to tensors with one entry per row (or
    None); ``shared`` maps the others; ``info`` has one :class:`RowInfo` per row."""

    def __call__(self, model: nn.Module, rows: Mapping[str, torch.Tensor | None], shared: Mapping[str, Any],
                 info: list[RowInfo]) -> torch.Tensor: ...


def model_output(out: Any) -> torch.Tensor:
    """The prediction tensor of a model's output (ours returns a tensor; a diffusers model an output object)."""
    return out if isinstance(out, torch.Tensor) else out[0]


class LocalForward:
    """All rows in one forward of the local model."""

    def __repr__(self) -> str:
        return "LocalForward()"

    def __call__(self, model: nn.Module, rows: Mapping[str, torch.Tensor | None], shared: Mapping[str, Any],
                 info: list[RowInfo]) -> torch.Tensor:
        return model_output(model(**rows, **shared))


def row_forward_for(mesh: Any) -> RowForward:
    """The row strategy for a denoiser replica on ``mesh`` (sequence parallelism needs none of its own).

    Strategies compose outside in: CFG parallel (``cfg > 1``, :class:`CFGParallel`) spreads the rows over the cfg
    group and hands each rank's share to the inner strategy: with ``pp > 1`` layer PP
    (``pipeline_parallel.PipelineForward``, ``pp_mode = "layer"``) or PipeFusion (``pipefusion.PipeFusionForward``),
    else the local forward. Every pp rank of a cfg index holds the same share, so the pipeline sees equal rows."""
    inner: RowForward = LocalForward()
    if mesh is not None and mesh.size("pp") > 1:
        spec = mesh.spec
        if spec.pp_mode == "pipefusion":
            from omni_runtime.parallel.strategies.pipefusion import PipeFusionForward

            inner = PipeFusionForward(mesh.group("pp"), patches=spec.pipefusion_patches or spec.pp,
                                      warmup=spec.pipefusion_warmup)
        else:
            from omni_runtime.parallel.strategies.pipeline_parallel import PipelineForward

            inner = PipelineForward(mesh.group("pp"), microbatches=spec.pp_microbatches)
    if mesh is not None and mesh.size("cfg") > 1:
        return CFGParallel(mesh.group("cfg"), inner)
    return inner
