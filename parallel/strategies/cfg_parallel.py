"""CFG parallel: one denoising step's rows spread over the ranks of the cfg group, predictions all-gathered.

A step's rows are (request, branch) pairs (:class:`parallel.strategies.row_forward.RowInfo`): the conditional
branch of each request, its unconditional branch under true CFG, or the N branches of multi-branch guidance. Under
``cfg = C`` this :class:`~parallel.strategies.row_forward.RowForward`

1. deals the rows to the C cfg ranks (:func:`assign_rows`): ordered by request, then branch, round-robin. A lone
   request's branch ``k`` runs on cfg rank ``k % C`` (the reference's rule); rows of several requests spread evenly
   (the counts differ by at most one), so requests without a negative branch become data parallel over the cfg
   ranks instead of leaving a rank idle;
2. runs this rank's share through ``inner`` (a ``RowForward`` too: :class:`LocalForward`, which also covers
   sequence parallel inside the model, or pipeline parallel; the ranks of the inner groups share the cfg index and
   so the share). A rank with no rows computes nothing: no dummy forward;
3. all-gathers the predictions over the cfg group, once per step: every rank contributes a buffer of the largest
   share's row count (a rank with fewer rows pads it; the padding is never read), and the rows are put back in
   the caller's order.

Every rank then holds every row's prediction, combines the branches and steps the scheduler itself, so latents stay
identical on all ranks without a broadcast.

A row's prediction has the shape and dtype of its ``hidden_states`` row (the scheduler step adds it to the
latents): that is how a rank without rows sizes its part of the gather without asking the others.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from omni_runtime.parallel.group_coordinator import GroupCoordinator

if TYPE_CHECKING:  # row_forward picks this strategy: importing it here at run time would close a circle
    from omni_runtime.parallel.strategies.row_forward import RowForward, RowInfo

logger = logging.getLogger(__name__)

__all__ = ["CFGParallel", "assign_rows"]


def assign_rows(info: Sequence[RowInfo], degree: int) -> list[list[int]]:
    """For each of ``degree`` cfg ranks, the indices (into ``info``) of the rows it computes, ascending.

    Rows are ordered by request (first appearance in ``info``), then branch, and dealt round-robin: branch ``k`` of
    the first request goes to rank ``k % degree``, and every rank gets ``len(info) // degree`` or one more rows."""
    if degree < 1:
        raise ValueError(f"degree = {degree}: must be >= 1")
    order: dict[int, int] = {}
    for row in info:
        order.setdefault(row.request, len(order))
    ranked = sorted(range(len(info)), key=lambda j: (order[info[j].request], info[j].branch, j))
    shares: list[list[int]] = [[] for _ in range(degree)]
    for pos, j in enumerate(ranked):
        shares[pos % degree].append(j)
    return [sorted(s) for s in shares]


def _select(t: torch.Tensor | None, index: list[int]) -> torch.Tensor | None:
    if t is None:
        return None
    n = t.shape[0]
    if index == list(range(index[0], index[0] + len(index))) and index[-1] < n:  # a contiguous run: a view
        return t[index[0]:index[0] + len(index)]
    return t.index_select(0, torch.tensor(index, device=t.device))


class CFGParallel:
    """The rows of a step over the cfg group ``group``, each rank's share computed by ``inner``.

    ``like``: the row argument whose per-row shape and dtype a prediction has (``hidden_states``)."""

    def __init__(self, group: GroupCoordinator, inner: RowForward, like: str = "hidden_states") -> None:
        self.group = group
        self.inner = inner
        self.like = like

    @property
    def degree(self) -> int:
        return self.group.world_size

    def __repr__(self) -> str:
        return f"CFGParallel(cfg {self.degree}, rank {self.group.rank_in_group}, inner={self.inner!r})"

    def __call__(self, model: nn.Module, rows: Mapping[str, torch.Tensor | None], shared: Mapping[str, Any],
                 info: list[RowInfo]) -> torch.Tensor:
        if self.like not in rows or rows[self.like] is None:
            raise ValueError(f"CFGParallel: the rows have no {self.like!r} tensor to size the predictions by; "
                             f"row arguments: {sorted(rows)}")
        like = rows[self.like]
        n = len(info)
        for name, t in rows.items():
            if t is not None and t.shape[0] != n:
                raise ValueError(f"CFGParallel: row argument {name!r} has {t.shape[0]} rows, info has {n}")
        shares = assign_rows(info, self.degree)
        width = max(len(s) for s in shares)
        mine = shares[self.group.rank_in_group]
        buf = torch.empty((width, *like.shape[1:]), dtype=like.dtype, device=like.device)
        if mine:
            sub = {name: _select(t, mine) for name, t in rows.items()}
            pred = self.inner(model, sub, shared, [info[j] for j in mine])
            if tuple(pred.shape) != (len(mine), *like.shape[1:]):
                raise ValueError(f"CFGParallel: the model's prediction has shape {tuple(pred.shape)}; expected "
                                 f"{(len(mine), *like.shape[1:])}, the shape of the {self.like!r} rows")
            if len(mine) == width:
                buf = pred.to(like.dtype).contiguous()
            else:
                buf[:len(mine)].copy_(pred)
                buf[len(mine):].zero_()  # padding: never read, but defined bytes on the wire
        else:
            buf.zero_()
        gathered = self.group.all_gather(buf, dim=0)  # (degree * width, ...): rank r's rows at [r * width, ...)
        source = [0] * n
        for r, share in enumerate(shares):
            for pos, j in enumerate(share):
                source[j] = r * width + pos
        if source == list(range(n)):
            return gathered[:n]
        return gathered.index_select(0, torch.tensor(source, device=gathered.device))
