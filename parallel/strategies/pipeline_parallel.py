"""Pipeline parallelism for the denoiser: layer PP (GPipe micro-batches) and PipeFusion, as row strategies.

**The split.** A model declares a :class:`PipelinePlan` as ``_pp_plan``: the submodules that run before the blocks
(the embedders: first stage only), the block lists (their concatenation is split over the pp ranks with
:func:`parallel.utils.get_pp_indices`, the documented uneven rule) and the head (last stage only).
:func:`partition_model` replaces every submodule another stage owns by a parameterless :class:`PPMissingLayer`
(vLLM's name) *before the weights are read*, so the loader reads from the safetensors exactly the keys the stage's
``state_dict()`` still names: each pp rank holds and loads only its share.

**The model's part.** A pipelined model's ``forward`` takes ``intermediate`` (the activations the previous stage
sent; ``None`` on the first stage), runs the blocks it holds, and returns the activations for the next stage (a
dict of tensors) unless it holds the head. The model does no communication and no rank arithmetic; the strategies
here move the dicts with ``GroupCoordinator.send_tensor_dict`` / ``recv_tensor_dict`` over the mesh's pp group.

**Layer PP** (:class:`PipelineForward`, ``pp_mode = "layer"``): one step's rows are cut into ``pp_microbatches``
micro-batches (0: one per row). Stage ``s`` receives micro-batch ``k`` from ``s - 1``, runs its blocks and sends
it to ``s + 1`` (GPipe fill and drain: with ``m`` micro-batches and ``S`` stages a step takes ``m + S - 1``
slots, a bubble of ``(S - 1) / (m + S - 1)``). The last stage keeps the predictions until its last micro-batch,
then **broadcasts the whole step's prediction over the pp group**; every rank steps the scheduler identically, so
the latents are the same everywhere and the denoiser loop is unchanged (the :class:`RowForward` contract). Bytes a
step sends: each stage ``s < S-1`` its activations ``rows x (image tokens + text tokens + 1) x dim`` once; the
last stage ``(S - 1) x rows x image tokens x out_channels`` (the prediction, the size of the latents). The other
choice, the last stage stepping the scheduler and sending latents to the first only, would save ``S - 2`` copies
of the prediction but break the contract that every rank returns it (CFG wraps this strategy). Exact: every row
runs the same blocks in the same order as on one rank (only matmul batch sizes differ).

Under sequence parallelism each sp rank of stage ``s`` exchanges its own image-token shard with the rank of the
same sp index of stage ``s + 1`` (that pair is a pp group): activations stay sharded, the head gathers.

**PipeFusion** (:class:`PipeFusionForward`, ``pp_mode = "pipefusion"``): see its docstring.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from omni_runtime.parallel.utils import balanced_ranges, get_pp_indices

logger = logging.getLogger(__name__)

__all__ = ["PPMissingLayer", "PipelineError", "PipelineForward", "PipelinePlan", "PipelineStats", "block_ranges",
           "count_blocks", "partition_model", "split_rows", "stage_of"]




class PipelineError(ValueError):
    """A pipeline split that cannot work (more stages than blocks, an undeclared plan); names key and numbers."""


@dataclass(frozen=True)
class PipelinePlan:
    """What a model's pipeline stages hold: ``pre`` (first stage), ``blocks`` (ModuleLists split over the stages,
    in this order) and ``head`` (last stage); module paths relative to the model."""

    pre: tuple[str, ...]
    blocks: tuple[str, ...]
    head: tuple[str, ...]


class PPMissingLayer(nn.Module):
    """A module held by another pipeline stage: no parameters, and calling it is a bug."""

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.missing_name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.missing_name or 'this module'} is held by another pipeline stage")


def is_missing(module: nn.Module | None) -> bool:
    """True for a :class:`PPMissingLayer` (a module another stage holds)."""
    return isinstance(module, PPMissingLayer)


def plan_of(model: nn.Module) -> PipelinePlan:
    plan = getattr(model, "_pp_plan", None)
    if not isinstance(plan, PipelinePlan):
        raise PipelineError(f"{type(model).__name__} declares no _pp_plan (a PipelinePlan); it cannot be split "
                            f"into pipeline stages (set stages.denoiser.parallel.pp = 1)")
    return plan


def count_blocks(model: nn.Module) -> int:
    """The number of blocks the model's ``_pp_plan`` splits (all block lists together)."""
    return sum(len(model.get_submodule(name)) for name in plan_of(model).blocks)


def stage_of(num_blocks: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """``(start, end)`` of the blocks pp rank ``pp_rank`` of ``pp_size`` holds (``get_pp_indices``), or a
    :class:`PipelineError` naming ``stages.denoiser.parallel.pp`` when there are fewer blocks than stages."""
    if num_blocks < pp_size:
        raise PipelineError(f"stages.denoiser.parallel.pp = {pp_size}: the model has {num_blocks} transformer "
                            f"block(s) and every pipeline stage needs at least one; allowed: pp <= {num_blocks}")
    return get_pp_indices(num_blocks, pp_rank, pp_size)


def block_ranges(num_blocks: int, pp_size: int) -> list[tuple[int, int]]:
    """Every pp rank's ``(start, end)`` block range."""
    return [stage_of(num_blocks, r, pp_size) for r in range(pp_size)]


def partition_model(model: nn.Module, pp_rank: int, pp_size: int) -> nn.Module:
    """Keep only pp rank ``pp_rank``'s part of ``model`` (in place, before loading weights): its blocks, the
    ``pre`` modules on the first stage, the ``head`` on the last; the rest become :class:`PPMissingLayer`.
    Returns the model; ``model.state_dict()`` then names exactly the tensors this stage loads."""
    plan = plan_of(model)
    start, end = stage_of(count_blocks(model), pp_rank, pp_size)
    first, last = pp_rank == 0, pp_rank == pp_size - 1

    def drop(path: str) -> None:
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, name, PPMissingLayer(path))

    for path in plan.pre if not first else ():
        drop(path)
    for path in plan.head if not last else ():
        drop(path)
    index = 0
    for path in plan.blocks:
        blocks = model.get_submodule(path)
        for i in range(len(blocks)):
            if not start <= index < end:
                blocks[i] = PPMissingLayer(f"{path}.{i}")
            index += 1
    model.pp_stage = (pp_rank, pp_size, start, end)  # informative: logs, tests
    logger.info("pipeline stage %d/%d holds blocks [%d, %d)%s%s", pp_rank, pp_size, start, end,
                " + embedders" if first else "", " + head" if last else "")
    return model


# ----------------------------------------------------------------------------------------------------------------
# rows -> micro-batches


def split_rows(n: int, parts: int) -> list[tuple[int, int]]:
    """``n`` rows in ``min(parts, n)`` contiguous micro-batches, sizes differing by at most one (larger first)."""
    return balanced_ranges(n, max(1, min(parts, n)))


def _slice_rows(rows: Mapping[str, torch.Tensor | None], start: int, end: int) -> dict[str, torch.Tensor | None]:
    return {k: (v[start:end] if isinstance(v, torch.Tensor) else v) for k, v in rows.items()}


@dataclass
class PipelineStats:
    """What this rank did in the forwards since :meth:`reset`: seconds computing, waiting to receive, sending,
    and in all (bench_parallel's bubble fraction is ``1 - compute / total`` summed over the stages)."""

    compute_s: float = 0.0
    recv_s: float = 0.0
    send_s: float = 0.0
    total_s: float = 0.0
    steps: int = 0
    microbatches: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def reset(self) -> None:
        self.compute_s = self.recv_s = self.send_s = self.total_s = 0.0
        self.steps = self.microbatches = 0
        self.extra.clear()


def run_unit(g: Any, st: PipelineStats, model: nn.Module, rows: Mapping[str, Any], shared: Mapping[str, Any],
             preds: list[torch.Tensor]) -> None:
    """One unit of a step (a micro-batch, a PipeFusion patch) on this rank of the pp group ``g``: receive the
    previous stage's activations (not on the first stage), run ``model(**rows, **shared, intermediate=...)``, then
    send the result to the next stage or, on the last, keep it in ``preds``. The seconds go to ``st``."""
    s, last = g.rank_in_group, g.rank_in_group == g.world_size - 1
    inter = None
    if s > 0:
        t = time.perf_counter()
        inter = g.recv_tensor_dict(src=s - 1)
        st.recv_s += time.perf_counter() - t
    t = time.perf_counter()
    out = model(**rows, **shared, intermediate=inter)
    st.compute_s += time.perf_counter() - t
    if last:
        preds.append(out)
    else:
        t = time.perf_counter()
        g.send_tensor_dict(out, dst=s + 1)
        st.send_s += time.perf_counter() - t


def broadcast_prediction(g: Any, st: PipelineStats, preds: list[torch.Tensor], dim: int, t_all: float,
                         units: int) -> torch.Tensor:
    """The end of a step: the last stage broadcasts the step's prediction (its ``preds`` concatenated along
    ``dim``) to every rank of the pp group; ``st`` counts the step (begun at ``t_all``) and its ``units``."""
    t = time.perf_counter()
    last = g.rank_in_group == g.world_size - 1
    msg = g.broadcast_tensor_dict({"prediction": torch.cat(preds, dim=dim)} if last else None, src=g.world_size - 1)
    st.recv_s += time.perf_counter() - t
    st.total_s += time.perf_counter() - t_all
    st.steps += 1
    st.microbatches += units
    return msg["prediction"]


class PipelineForward:
    """Layer pipeline parallelism over ``group`` (the mesh's pp group) with ``microbatches`` micro-batches per
    step (0: one per row). The model on this rank must have been cut by :func:`partition_model`."""

    def __init__(self, group: Any, microbatches: int = 0) -> None:
        self.group = group
        self.microbatches = microbatches
        self.stats = PipelineStats()

    def __call__(self, model: nn.Module, rows: Mapping[str, torch.Tensor | None], shared: Mapping[str, Any],
                 info: Sequence[Any]) -> torch.Tensor:
        """``row_forward.RowForward``: the prediction of every row (``info``: one ``RowInfo`` per row), on every
        rank of the pp group."""
        t_all = time.perf_counter()
        preds: list[torch.Tensor] = []
        chunks = split_rows(len(info), self.microbatches or len(info))
        for a, b in chunks:
            run_unit(self.group, self.stats, model, _slice_rows(rows, a, b), shared, preds)
        return broadcast_prediction(self.group, self.stats, preds, 0, t_all, len(chunks))
