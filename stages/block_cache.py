"""Cache acceleration: skip a DiT's middle blocks on steps whose first blocks' output barely changed, per row.

One place for every model family. A family's transformer declares its block lists in ``_cache_plan``
(:class:`CachePlan`: Flux ``("transformer_blocks", "single_transformer_blocks")``, Qwen-Image
``("transformer_blocks",)``, Wan ``("blocks",)``) and calls :func:`run_blocks` instead of looping over them; every block takes
``(img, txt, *extra)`` and returns ``(img, txt)``. The residual that decides is the image stream's.

Methods (:class:`CacheConfig`):

- ``first_block``: diffusers' First-Block Cache (``FirstBlockCacheConfig(threshold)`` /
  ``apply_first_block_cache``): after the first block, the relative L1 change of its image residual
  (``mean|r - r_prev| / mean|r_prev|``, ``r_prev`` the residual of the last step that computed) decides; above
  ``threshold`` every other block runs (and their residual, image and text, over the first block's output is kept),
  else they are skipped and the kept residual is added to the first block's output. The first step always computes.
- ``dbcache``: the DBCache layout of the same rule: the first ``fn`` blocks always run (the residual that decides is
  their output minus their input), the last ``bn`` blocks always run (on the cached middle's output), the middle is
  cached; the first ``warmup_steps`` steps of a row always compute, and after ``max_cached_steps`` consecutive cached
  steps (0: no cap) the next one computes. ``fn = 1, bn = 0, warmup_steps = 0, max_cached_steps = 0`` is
  ``first_block``.

Per row: the running set gives every (request, branch) row a key (:func:`row_key`); :class:`BlockCache` holds each
row's state by key (its tensors where the row was computed, its counters on every rank), so rows join and leave at
any step and every CFG branch has its own state, as diffusers' ``cache_context("cond" / "uncond")``. In a batched
forward rows decide alone: the blocks a row skips run on the sub-batch of the rows that compute them (a row never
runs on values of another), so a cached and an uncached request sharing a forward each get their solo result up to
the rounding of a smaller batched matmul (as batching itself). Computing every row and selecting would be as exact
but spend the work the cache saves.

Layouts (the decision is the same on every rank of a replica): under sequence parallelism a row's image residual
is sharded over the sp group, so the two L1 sums are all-reduced over it before deciding (``BlockCache(sp_group)``).
Under CFG parallel each rank computes its share of the rows (``assign_rows``): the counters of every row are kept on
every rank (each step's decisions are all-reduced over the cfg group in :meth:`BlockCache.finish_step`), and when a
row's share moves to another rank its tensors are broadcast there first (:meth:`BlockCache.before_step`). HSDP
computes every row on every rank alike. Pipeline parallelism (layer or PipeFusion) is refused
(:data:`UNSUPPORTED_LAYOUT`): a stage holds only some of the blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from omni_runtime.parallel.strategies.cfg_parallel import assign_rows
from omni_runtime.parallel.strategies.pipeline_parallel import is_missing
from omni_runtime.stages.cache_config import CacheConfig, CacheStats

logger = logging.getLogger(__name__)

__all__ = ["UNSUPPORTED_LAYOUT", "BlockCache", "CachePlan", "row_key", "run_blocks"]

UNSUPPORTED_LAYOUT = ("pipeline parallelism (pp > 1, layer or PipeFusion): a pipeline stage holds only some of the "
                      "blocks, so the first block's residual and the cached middle are not on one rank")
#: the key of a row: request slot and branch (branches < 2**8)
_BRANCH_BITS = 8


def row_key(request: int, branch: int) -> int:
    return (request << _BRANCH_BITS) | branch


@dataclass(frozen=True)
class CachePlan:
    """A family's declaration: the model's block lists, in the order they run (each block ``(img, txt, *extra)
    -> (img, txt)``), and, where its authors published them, TeaCache's rescaling polynomial (coefficients, highest
    power first, as ``numpy.poly1d``) of the relative L1 change of the first block's timestep-modulated input
    (the model passes that input to :func:`run_blocks`)."""

    blocks: tuple[str, ...]
    teacache: tuple[float, ...] = ()

    def block_list(self, model: nn.Module) -> list[nn.Module]:
        return [b for name in self.blocks for b in getattr(model, name)]


@dataclass
class _Row:
    """One row's state. Counters are the same on every rank; tensors live where the row was last computed."""

    config: CacheConfig
    steps: int = 0          # forwards done
    consecutive: int = 0    # cached forwards in a row
    cached_steps: int = 0
    cached_blocks: int = 0
    blocks: int = 0
    owner: int = 0          # cfg rank that holds the tensors
    total: int = 0          # the request's steps (TeaCache computes the last)
    # head_res, mid_img, mid_txt; TeaCache: mod_in (the previous modulated input), acc (the accumulated distance)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    last_skip: int = 0      # blocks this rank skipped for the row in the current step (-1: computed here)


class BlockCache:
    """The cache state of every running row on this rank, and the layout's groups: ``sp_group`` (the L1 sums are
    all-reduced over it) and ``cfg_group`` (rows spread over it: counters synced, moved tensors broadcast)."""

    def __init__(self, sp_group: Any = None, cfg_group: Any = None) -> None:
        self.sp_group = sp_group if sp_group is not None and sp_group.world_size > 1 else None
        self.cfg_group = cfg_group if cfg_group is not None and cfg_group.world_size > 1 else None
        self.rows: dict[int, _Row] = {}

    def admit(self, key: int, config: CacheConfig, steps: int = 0) -> None:
        self.rows[key] = _Row(config, total=steps)

    def forget(self, keys: Sequence[int]) -> None:
        for k in keys:
            self.rows.pop(k, None)

    def stats(self, keys: Sequence[int]) -> CacheStats | None:
        rows = [self.rows[k] for k in keys if k in self.rows]
        if not rows:
            return None
        out = CacheStats(rows[0].config.method)
        for r in rows:
            out.steps += r.steps
            out.cached_steps += r.cached_steps
            out.blocks += r.blocks
            out.cached_blocks += r.cached_blocks
        return out

    # --- around a step (every rank of the replica, with the step's rows in order) -----------------------------

    def before_step(self, keys: Sequence[int], info: Sequence[Any]) -> None:
        """Under CFG parallel: move the tensors of rows whose share moved to another cfg rank (a broadcast from the
        rank that holds them; every rank of the group calls this with the same rows)."""
        for k in keys:
            if k in self.rows:
                self.rows[k].last_skip = 0
        g = self.cfg_group
        if g is None:
            return
        shares = assign_rows(list(info), g.world_size)
        owner = {j: r for r, share in enumerate(shares) for j in share}
        for j, k in enumerate(keys):
            row = self.rows.get(k)
            if row is None or row.owner == owner[j]:
                continue
            if row.steps:  # it has tensors on its old owner
                got = g.broadcast_tensor_dict(row.tensors if g.rank_in_group == row.owner else None, src=row.owner)
                row.tensors = dict(got) if g.rank_in_group == owner[j] else {}
            row.owner = owner[j]

    def finish_step(self, keys: Sequence[int], blocks: int) -> None:
        """After a step: every rank learns each row's decision (under CFG parallel from the rank that computed it)
        and counts it."""
        mine = [k for k in keys if k in self.rows]
        if not mine:
            return
        skipped = torch.tensor([self.rows[k].last_skip for k in mine], dtype=torch.int64)
        if self.cfg_group is not None:  # a row computed elsewhere is 0 here; -1 marks "computed" where it ran
            dev = self.cfg_group.device if self.cfg_group.device.type != "cpu" else torch.device("cpu")
            skipped = self.cfg_group.all_reduce(skipped.to(dev)).cpu()
        for k, s in zip(mine, skipped.tolist(), strict=True):
            row = self.rows[k]
            row.steps += 1
            row.blocks += blocks
            if s > 0:
                row.cached_steps += 1
                row.cached_blocks += s
                row.consecutive += 1
            else:
                row.consecutive = 0

    # --- inside the forward --------------------------------------------------------------------------------

    def _rel_l1(self, rows: list[_Row], x: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
        """(rows, 2) float64: ``sum|x - prev|`` and ``sum|prev|`` of each row against its tensor ``name`` (zeros
        where it has none), over this rank's real tokens, all-reduced over the sp group."""
        sums = torch.zeros(len(rows), 2, dtype=torch.float64, device=x.device)
        for j, row in enumerate(rows):
            prev = row.tensors.get(name)
            if prev is None:
                continue
            d, p = (x[j] - prev[0]).abs(), prev[0].abs()
            if mask is not None:
                d, p = d[mask[j]], p[mask[j]]
            sums[j, 0], sums[j, 1] = d.sum(dtype=torch.float64), p.sum(dtype=torch.float64)
        if self.sp_group is not None:
            sums = self.sp_group.all_reduce(sums)
        return sums

    def _teacache(self, rows: list[_Row], mod: torch.Tensor, mask: torch.Tensor | None,
                  coefficients: Sequence[float]) -> list[bool]:
        """TeaCache's decision (TeaCache4FLUX): the first and last steps compute; else the rescaled relative L1
        change of the modulated input ``mod`` is accumulated, and the row computes (and resets it) once it reaches
        the threshold. The previous modulated input is updated every step."""
        sums = self._rel_l1(rows, mod, mask, "mod_in")
        out = []
        for j, row in enumerate(rows):
            t = row.tensors
            acc = float(t["acc"]) if "acc" in t else 0.0
            if row.steps == 0 or row.steps >= row.total - 1 or "mid_img" not in t:
                compute, acc = True, 0.0
            else:
                rel = (sums[j, 0] / sums[j, 1]).item()
                acc += sum(c * rel ** (len(coefficients) - 1 - i) for i, c in enumerate(coefficients))
                compute = not acc < row.config.threshold  # NaN computes
                acc = 0.0 if compute else acc
            t["acc"], t["mod_in"] = torch.tensor(acc, dtype=torch.float64), mod[j:j + 1].clone()
            out.append(compute)
        return out

    def _should_compute(self, rows: list[_Row], res: torch.Tensor, mask: torch.Tensor | None) -> list[bool]:
        """The decision of each of ``rows`` from its head residual ``res`` (rows, tokens, dim) (this rank's tokens;
        ``mask`` (rows, tokens) its real ones): diffusers' ``mean|r - prev| / mean|prev| > threshold``, the sums
        all-reduced over the sp group."""
        sums = self._rel_l1(rows, res, mask, "head_res")
        out = []
        for j, row in enumerate(rows):
            c = row.config
            if "head_res" not in row.tensors or row.steps < c.warmup_steps or \
                    (c.max_cached_steps and row.consecutive >= c.max_cached_steps):
                out.append(True)
                continue
            out.append(not (sums[j, 0] / sums[j, 1]).item() <= c.threshold)  # NaN computes
        return out


def _take(x: Any, idx: torch.Tensor | None, per_row: bool) -> Any:
    if idx is None or not per_row or x is None:
        return x
    if isinstance(x, tuple):
        return tuple(t.index_select(0, idx) for t in x)
    return x.index_select(0, idx)


def _run(blocks: Sequence[nn.Module], img: torch.Tensor, txt: torch.Tensor, extra: tuple, per_row: tuple,
         idx: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``blocks`` on the rows ``idx`` (None: all) of ``img`` / ``txt``; the other rows stay as they are."""
    if not blocks or (idx is not None and not idx):
        return img, txt
    if idx is None or len(idx) == img.shape[0]:
        for block in blocks:
            img, txt = block(img, txt, *extra)
        return img, txt
    sel = torch.tensor(idx, device=img.device)
    sub_extra = tuple(_take(x, sel, p) for x, p in zip(extra, per_row, strict=True))
    i, t = img.index_select(0, sel), txt.index_select(0, sel)
    for block in blocks:
        i, t = block(i, t, *sub_extra)
    return img.index_copy(0, sel, i), txt.index_copy(0, sel, t)


def run_blocks(blocks: Sequence[nn.Module], img: torch.Tensor, txt: torch.Tensor, extra: tuple,
               per_row: tuple[bool, ...], cache: BlockCache | None = None, cache_rows: torch.Tensor | None = None,
               token_mask: torch.Tensor | None = None, plan: CachePlan | None = None,
               modulated: Callable[[], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``blocks`` (each ``block(img, txt, *extra) -> (img, txt)``; ``per_row[i]``: ``extra[i]`` has one entry
    per row, a tuple of tensors each) over rows ``img`` (rows, tokens, dim) / ``txt``, skipping what each row's
    cache (``cache_rows``: the rows' keys in ``cache``) says. ``token_mask`` (rows, tokens): each row's real image
    tokens (mixed sizes), the residual's L1 is taken over them. Without a cache: every block (blocks another
    pipeline stage holds are left out). TeaCache rows: ``plan`` (the family's declaration) and ``modulated``
    (gives every row's modulated input of the first block)."""
    if cache is None or cache_rows is None:
        for block in blocks:
            if not is_missing(block):
                img, txt = block(img, txt, *extra)
        return img, txt
    n = len(blocks)
    keys = cache_rows.tolist()
    rows = [cache.rows.get(k) for k in keys]
    plain = [r is None or not r.config.enabled or r.config.fn + r.config.bn >= n for r in rows]
    tea = [not p and r.config.method == "teacache" for r, p in zip(rows, plain, strict=True)]
    if any(tea) and (modulated is None or plan is None or not plan.teacache):
        raise ValueError("a TeaCache row, but the model passed no modulated input or declares no coefficients")
    fn = [0 if p or t else r.config.fn for r, p, t in zip(rows, plain, tea, strict=True)]
    tail = [n if p or t else n - r.config.bn for r, p, t in zip(rows, plain, tea, strict=True)]
    bounds = sorted({0, n, *fn, *tail})
    skipping: set[int] = set()
    head_in = img
    head_out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for a, b in zip(bounds, bounds[1:] + [n], strict=True):
        deciding = [j for j in range(len(rows)) if not plain[j] and fn[j] == a]
        if a == 0 and any(tea):  # TeaCache: before the first block, from its modulated input
            deciding = [j for j in deciding if not tea[j]]
            teas = [j for j in range(len(rows)) if tea[j]]
            sel = torch.tensor(teas, device=img.device)
            mask = token_mask[teas] if token_mask is not None else None
            compute = cache._teacache([rows[j] for j in teas], modulated().index_select(0, sel), mask, plan.teacache)
            for j, c in zip(teas, compute, strict=True):
                if c:
                    head_out[j] = (img[j:j + 1].clone(), txt[j:j + 1].clone())
                    rows[j].last_skip = -1
                else:
                    skipping.add(j)
                    rows[j].last_skip = n
        if deciding:
            res = img.index_select(0, torch.tensor(deciding, device=img.device)) - \
                head_in.index_select(0, torch.tensor(deciding, device=img.device))
            mask = token_mask[deciding] if token_mask is not None else None
            compute = cache._should_compute([rows[j] for j in deciding], res, mask)
            for pos, (j, c) in enumerate(zip(deciding, compute, strict=True)):
                rows[j].tensors["head_res"] = res[pos:pos + 1] if c else rows[j].tensors["head_res"]
                if c:
                    head_out[j] = (img[j:j + 1].clone(), txt[j:j + 1].clone())
                    rows[j].last_skip = -1
                else:
                    skipping.add(j)
                    rows[j].last_skip = tail[j] - fn[j]
        for j in [j for j in range(len(rows)) if not plain[j] and tail[j] == a and fn[j] < a]:
            t = rows[j].tensors
            if j in skipping:  # the cached middle: its residual over the head's output
                img = img.index_copy(0, torch.tensor([j], device=img.device), t["mid_img"] + img[j:j + 1])
                txt = txt.index_copy(0, torch.tensor([j], device=txt.device), t["mid_txt"] + txt[j:j + 1])
                skipping.discard(j)
            else:
                t["mid_img"], t["mid_txt"] = img[j:j + 1] - head_out[j][0], txt[j:j + 1] - head_out[j][1]
        if a == n:
            break
        active = [j for j in range(len(rows)) if j not in skipping]
        img, txt = _run(blocks[a:b], img, txt, extra, per_row, None if len(active) == len(rows) else active)
    return img, txt
