"""PipeFusion (xDiT): pipeline stages over image-token patches, reusing the previous step's K/V of the others.

The pp ranks hold the same blocks as under layer PP (``pipeline_parallel.partition_model``). A denoising step's
image tokens are cut into ``patches`` contiguous patches of whole token rows (``img_ids`` row index; the patch
count is at most the image's token rows, checked per request by the denoiser). Stage ``s`` runs its blocks on one
patch at a time and passes it on (``send_tensor_dict``: the patch's image tokens, the text tokens and the
conditioning vector), so the stages work on different patches at once (fill and drain of ``patches`` units).

Each attention layer keeps a K/V cache of the full image sequence per row (keyed by ``RowInfo.request`` and
``branch``). A patch's queries attend over its own fresh K/V, the fresh K/V of the patches before it in this step,
and the **stale** K/V of the later patches from the previous step; its fresh K/V is written into the cache. Text
tokens travel with every patch and attend fresh (FLUX's text stream is recomputed per patch; the image output
only depends on the patch's own copy).

Steps before ``warmup`` (and any step where a row has no cache from the previous step: a new request, a size
change) run **synchronously**: one unit with every token, exact, filling the caches. The result is an
approximation by design (the stale K/V); ``tests/test_pipefusion.py`` bounds it by PSNR against the exact run.

As under layer PP the last stage broadcasts the step's whole prediction to every pp rank (the ``RowForward``
contract); every rank steps the scheduler identically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from omni_runtime.parallel.attention import Attention
from omni_runtime.parallel.attention.backends import attention_block
from omni_runtime.parallel.strategies.pipeline_parallel import (
    PipelineStats,
    broadcast_prediction,
    run_unit,
    split_rows,
)

logger = logging.getLogger(__name__)

__all__ = ["PipeFusionForward", "patch_ranges", "token_rows"]


def token_rows(img_ids: torch.Tensor) -> list[tuple[int, int]]:
    """The token ranges of the image's token rows (consecutive tokens with the same row id, ``img_ids[:, 1]``)."""
    rows = img_ids[:, 1]
    change = (rows[1:] != rows[:-1]).nonzero().flatten().tolist()
    starts = [0] + [c + 1 for c in change]
    ends = starts[1:] + [rows.shape[0]]
    return list(zip(starts, ends, strict=True))


def patch_ranges(img_ids: torch.Tensor, patches: int) -> list[tuple[int, int]]:
    """``patches`` token ranges of whole token rows (balanced, the first take the extra row)."""
    rows = token_rows(img_ids)
    if patches > len(rows):
        raise ValueError(f"pipefusion_patches = {patches} > the image's {len(rows)} token rows")
    return [(rows[a][0], rows[b - 1][1]) for a, b in split_rows(len(rows), patches)]


class _KVCache:
    """Per attention layer: the rows' keys and their full-sequence K and V, (rows, tokens, heads, head_dim)."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    def rows_for(self, layer: int, keys: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        held, k, v = self.layers[layer]
        if held != keys:  # rows left or were reordered since the last step: pick ours
            idx = torch.tensor([held.index(key) for key in keys], device=k.device)
            k, v = k.index_select(0, idx), v.index_select(0, idx)
            self.layers[layer] = (keys, k, v)
        return k, v


class _PipeFusionAttention(nn.Module):
    """An attention layer under PipeFusion: outside a PipeFusion forward, or in a synchronous step, the layer
    itself (recording this step's K/V); in a patch step, the patch's queries over the cached K/V of the whole image
    with the patch's fresh K/V written in (joint text tokens in front, as the layer does)."""

    def __init__(self, inner: Attention, index: int, owner: PipeFusionForward) -> None:
        super().__init__()
        self.inner = inner
        self.index = index
        self._owner = [owner]  # not a submodule

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, joint_q: torch.Tensor | None = None,
                joint_k: torch.Tensor | None = None, joint_v: torch.Tensor | None = None,
                joint_strategy: str = "none", key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        owner = self._owner[0]
        unit = owner._unit
        if unit is None or unit[0] == "sync":
            if unit is not None:  # every token fresh: the cache becomes this step's K/V
                owner.cache.layers[self.index] = (unit[1], k.clone(), v.clone())
            return self.inner(q, k, v, joint_q=joint_q, joint_k=joint_k, joint_v=joint_v,
                              joint_strategy=joint_strategy, key_padding_mask=key_padding_mask)
        if key_padding_mask is not None or joint_strategy == "rear":
            raise ValueError("PipeFusion supports joint text tokens in front and no key padding mask")
        _, keys, a, b = unit
        k_all, v_all = owner.cache.rows_for(self.index, keys)
        k_all[:, a:b] = k  # fresh for this patch (and for the later patches of this step)
        v_all[:, a:b] = v
        if joint_q is not None:
            q, k_all, v_all = (torch.cat([jq, x], dim=1) for jq, x in ((joint_q, q), (joint_k, k_all),
                                                                       (joint_v, v_all)))
        return attention_block(q, k_all, v_all, scale=self.inner.scale, backend=self.inner.backend)


class PipeFusionForward:
    """PipeFusion over ``group`` (the pp group) with ``patches`` token patches and ``warmup`` synchronous steps."""

    def __init__(self, group: Any, patches: int, warmup: int = 1) -> None:
        self.group = group
        self.patches = patches
        self.warmup = warmup
        self.stats = PipelineStats()
        self.cache = _KVCache()
        self._last_step: dict[tuple[int, int], tuple[int, int]] = {}  # row key -> (step, tokens) last run
        self._hooked: set[int] = set()
        self._unit: tuple[str, tuple, int, int] | None = None  # (mode, row keys, token start, token end)

    # ------------------------------------------------------------------ attention layers
    def _install(self, model: nn.Module) -> None:
        """Wrap every :class:`Attention` layer of this stage in a :class:`_PipeFusionAttention` (once per model)."""
        if id(model) in self._hooked:
            return
        sites = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
                 if isinstance(child, Attention)]
        for index, (parent, name) in enumerate(sites):
            setattr(parent, name, _PipeFusionAttention(getattr(parent, name), index, self))
        self._hooked.add(id(model))
        logger.info("pipefusion: %d attention layers on this stage, %d patches, %d warm-up step(s)", len(sites),
                    self.patches, self.warmup)

    # ------------------------------------------------------------------ one step
    def _synchronous(self, info: Sequence[Any], tokens: int) -> bool:
        for row in info:
            last = self._last_step.get((row.request, row.branch))
            if row.step < max(self.warmup, 1) or last != (row.step - 1, tokens):
                return True
        return False

    def __call__(self, model: nn.Module, rows: Mapping[str, torch.Tensor | None], shared: Mapping[str, Any],
                 info: Sequence[Any]) -> torch.Tensor:
        """``row_forward.RowForward``: the prediction of every row, on every rank of the pp group."""
        self._install(model)
        st = self.stats
        t_all = time.perf_counter()
        img_ids = shared["img_ids"]
        tokens = int(img_ids.shape[-2])
        keys = tuple((row.request, row.branch) for row in info)
        sync = self._synchronous(info, tokens)
        units = [(0, tokens)] if sync else patch_ranges(img_ids if img_ids.dim() == 2 else img_ids[0], self.patches)
        preds: list[torch.Tensor] = []
        try:
            for a, b in units:
                self._unit = ("sync" if sync else "stale", keys, a, b)
                run_unit(self.group, st, model, {**rows, "hidden_states": rows["hidden_states"][:, a:b]},
                         {**shared, "img_ids": img_ids[..., a:b, :]}, preds)
        finally:
            self._unit = None
        for key in keys:
            self._last_step[key] = (info[keys.index(key)].step, tokens)
        for key in [k for k in self._last_step if k not in keys]:  # rows that left: forget them
            del self._last_step[key]
        st.extra["sync_steps"] = st.extra.get("sync_steps", 0) + (1 if sync else 0)
        return broadcast_prediction(self.group, st, preds, 1, t_all, len(units))
