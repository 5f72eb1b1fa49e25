"""``sp_attention``: the functional entry point; runs none / Ulysses / Ring / hybrid over the ``SPMesh`` it is given.

The mesh is passed explicitly (an ``Attention`` layer holds the one its strategy bound at load); ``mesh=None`` is
plain local attention. Nothing is read from globals.

Layouts are (batch, seq, heads, head_dim). q/k/v are this rank's sequence shard;
``joint_*`` are replicated text tokens, identical on all ranks, placed before
("front") or after ("rear") the image tokens in the output. Text keys are counted
exactly once in every strategy; text queries attend to every image key too.
``joint_key_padding_mask`` (batch, text_seq) bool marks the real text tokens (True):
the others are no key for any query in any strategy. Padding text tokens are still
queries; their outputs are returned and are the caller's to discard.

Local lengths may differ between ranks. When the sp_plan hooks split exactly one
sequence layout in this forward, every rank already knows all lengths; otherwise a
sharded call first all-gathers ``(local_len, has_mask)`` over the SP group, so that
every rank pads and masks the same way (one tiny collective per call).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from omni_runtime.parallel.attention.backends import attention_block, default_scale
from omni_runtime.parallel.attention.ring import ring_attention
from omni_runtime.parallel.attention.sp_context import get_sp_forward_context
from omni_runtime.parallel.attention.ulysses import ulysses_attention
from omni_runtime.parallel.utils import cat_views

logger = logging.getLogger(__name__)

JOINT_STRATEGIES = ("none", "front", "rear")


class SPAttentionError(ValueError):
    """Bad arguments to sp_attention (names the argument, the value, what is allowed)."""


@dataclass(frozen=True)
class SPMesh:
    """The groups attention needs (GroupCoordinators) and the fp32 flag: the attention's view of a ``Mesh``."""

    sp: object
    ulysses: object
    ring: object
    convert_to_fp32: bool = True

    @classmethod
    def from_mesh(cls, mesh: Any, convert_to_fp32: bool = True) -> SPMesh:
        """The sp / ulysses / ring groups of a :class:`parallel.mesh.Mesh`."""
        return cls(sp=mesh.group("sp"), ulysses=mesh.group("ulysses"), ring=mesh.group("ring"),
                   convert_to_fp32=convert_to_fp32)

    @property
    def strategy(self) -> str:
        u, r = self.ulysses.world_size, self.ring.world_size
        if u > 1 and r > 1:
            return "hybrid"
        if u > 1:
            return "ulysses"
        if r > 1:
            return "ring"
        return "none"


def _check_args(q, k, v, joint_q, joint_k, joint_v, joint_strategy, key_padding_mask,
                joint_key_padding_mask=None) -> None:
    if joint_strategy not in JOINT_STRATEGIES:
        raise SPAttentionError(f"joint_strategy={joint_strategy!r} is not allowed; use one of {JOINT_STRATEGIES}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise SPAttentionError(f"{name} must be (batch, seq, heads, head_dim); got shape {tuple(t.shape)}")
    if k.shape != v.shape[:-1] + (k.shape[-1],) or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
        raise SPAttentionError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, seq and heads with "
                               f"q {tuple(q.shape)}")
    if q.shape[1] != k.shape[1] or q.shape[2] != k.shape[2]:
        raise SPAttentionError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same local_seq and heads "
                               "(self-attention over sequence shards)")
    joints = (joint_q, joint_k, joint_v)
    if joint_strategy == "none":
        if any(t is not None for t in joints):
            raise SPAttentionError("joint_q/joint_k/joint_v were given with joint_strategy='none'; "
                                   "use 'front' or 'rear'")
    else:
        if any(t is None for t in joints):
            raise SPAttentionError(f"joint_strategy={joint_strategy!r} needs joint_q, joint_k and joint_v")
        for name, t in zip(("joint_q", "joint_k", "joint_v"), joints, strict=True):
            if t.dim() != 4 or t.shape[0] != q.shape[0] or t.shape[2] != q.shape[2] or t.shape[1] != joint_q.shape[1]:
                raise SPAttentionError(f"{name} must be (batch={q.shape[0]}, text_seq, heads={q.shape[2]}, "
                                       f"head_dim); got {tuple(t.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != tuple(q.shape[:2]):
            raise SPAttentionError(f"key_padding_mask must be bool (batch, local_seq)={tuple(q.shape[:2])}; got "
                                   f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if joint_key_padding_mask is not None:
        if joint_strategy == "none":
            raise SPAttentionError("joint_key_padding_mask was given with joint_strategy='none' (no joint text "
                                   "tokens); pass joint_q/joint_k/joint_v with 'front' or 'rear', or no mask")
        want = (q.shape[0], joint_k.shape[1])
        if joint_key_padding_mask.dtype != torch.bool or tuple(joint_key_padding_mask.shape) != want:
            raise SPAttentionError(f"joint_key_padding_mask must be bool (batch, text_seq)={want} (True = a real "
                                   f"text token); got {joint_key_padding_mask.dtype} "
                                   f"{tuple(joint_key_padding_mask.shape)}")


def _context_mask(q: torch.Tensor, explicit: torch.Tensor | None) -> torch.Tensor | None:
    """The key mask to use: the caller's, with the pad that auto_pad added to this shard masked too.

    Without an explicit mask the auto_pad mask must cover this call's local sequence (else the
    call is over a sequence the plan did not pad: an error, not a guess). An explicit mask of
    another length is taken as it is.
    """
    ctx = get_sp_forward_context()
    if ctx is None or ctx.key_padding_mask is None:
        return explicit
    m = ctx.key_padding_mask
    if m.shape[-1] != q.shape[1]:
        if explicit is not None:
            return explicit
        raise SPAttentionError(
            f"the auto_pad key-padding mask covers {m.shape[-1]} local tokens but this attention call has "
            f"local_seq={q.shape[1]}; pass key_padding_mask explicitly for sequences the plan did not pad")
    m = m.to(q.device)
    m = m.expand(q.shape[0], -1) if m.dim() == 1 else m
    return m if explicit is None else explicit & m


def _local_inner(q, k, v, key_mask, jq, jk, jv, joint_mask=None, *, scale, return_lse, backend):
    """Attention over one rank's complete key set; joint text first in keys and queries. ``joint_mask``
    (batch, text) bool: the text keys that exist (None: all)."""
    t = 0 if jq is None else jq.shape[1]
    if t:
        q = cat_views([jq, q], dim=1)  # a view when the caller split one [text, image] tensor (no copy)
        k = cat_views([jk, k], dim=1)
        v = cat_views([jv, v], dim=1)
        if key_mask is not None or joint_mask is not None:
            b, n = q.shape[0], k.shape[1] - t
            text_mask = joint_mask if joint_mask is not None else torch.ones(b, t, dtype=torch.bool,
                                                                              device=q.device)
            image_mask = key_mask if key_mask is not None else torch.ones(b, n, dtype=torch.bool, device=q.device)
            key_mask = torch.cat([text_mask, image_mask], dim=1)
    if return_lse:
        out, lse = attention_block(q, k, v, key_mask=key_mask, scale=scale, return_lse=True, backend=backend)
    else:
        out = attention_block(q, k, v, key_mask=key_mask, scale=scale, backend=backend)
        lse = None
    text_out = out[:, :t] if t else None
    text_lse = lse[:, :t] if (t and lse is not None) else None
    return text_out, out[:, t:], text_lse, (None if lse is None else lse[:, t:])


def _ring_inner(q, k, v, key_mask, jq, jk, jv, joint_mask=None, *, ring_lens, group, scale, return_lse,
                convert_to_fp32, backend):
    return ring_attention(q, k, v, key_mask=key_mask, lens=ring_lens, group=group, joint_q=jq, joint_k=jk,
                          joint_v=jv, joint_key_mask=joint_mask, scale=scale, return_lse=return_lse,
                          convert_to_fp32=convert_to_fp32, backend=backend)


def _exchange_lengths(mesh: SPMesh, local_len: int, has_mask: bool) -> tuple[list[int], bool]:
    """Every SP rank's local length, and whether any rank has a key mask (one tiny gather on the cpu group)."""
    meta = torch.tensor([[local_len, int(has_mask)]], dtype=torch.int64)
    parts = mesh.sp.all_gather(meta, dim=0)  # a cpu tensor: the communicator sends it over the gloo group
    lens = [int(p[0]) for p in parts]
    return lens, any(int(p[1]) for p in parts)


def _lengths_from_context(mesh: SPMesh, local_len: int) -> list[int] | None:
    """Every rank's length from the hooks' record, when the forward split exactly one sequence layout.

    The record is identical on all ranks, so all of them take this path or all exchange. A mask is
    then assumed to be passed on all ranks or on none (model code is the same on every rank).
    """
    ctx = get_sp_forward_context()
    if ctx is None or len(ctx.shard_layouts) != 1 or len(ctx.shard_layouts[0]) != mesh.sp.world_size:
        return None
    lens = list(ctx.shard_layouts[0])
    if lens[mesh.sp.rank_in_group] != local_len:
        raise SPAttentionError(
            f"sp_attention got local_seq={local_len} on SP rank {mesh.sp.rank_in_group}, but the sequence the "
            f"sp_plan split has shards {lens}; attention over a sequence that is not this shard needs "
            "Attention(sequence_parallel=False) or a plan entry that splits it")
    return lens


def sp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    joint_q: torch.Tensor | None = None,
    joint_k: torch.Tensor | None = None,
    joint_v: torch.Tensor | None = None,
    joint_strategy: str = "none",
    key_padding_mask: torch.Tensor | None = None,
    joint_key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    mesh: SPMesh | None = None,
    convert_to_fp32: bool | None = None,
    local: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequence-parallel attention over ``mesh`` (None: local attention); see the module docstring for layouts.

    ``return_lse=True`` also returns the log-sum-exp (batch, out_seq, heads) in float32
    (float64 for float64 inputs), in the same token order as ``out``. ``convert_to_fp32``
    overrides the mesh's flag. ``local=True``: the inputs are not sequence shards (e.g. text-only attention); the
    call ignores ``mesh`` and the auto_pad mask the sp_plan hooks recorded. ``joint_key_padding_mask``
    (batch, text_seq) bool, True = a real text token: the others are no key in any strategy (the same on every
    rank, like the text tokens).
    """
    _check_args(q, k, v, joint_q, joint_k, joint_v, joint_strategy, key_padding_mask, joint_key_padding_mask)
    # the auto_pad mask belongs to the sharded sequence: a local call never sees it
    if local:
        mesh = None
    else:
        key_padding_mask = _context_mask(q, key_padding_mask)
    if scale is None:
        scale = default_scale(q.shape[-1])
    if joint_strategy == "none":
        joint_q = joint_k = joint_v = joint_key_padding_mask = None
    strategy = "none" if mesh is None else mesh.strategy
    fp32 = convert_to_fp32 if convert_to_fp32 is not None else (True if mesh is None else mesh.convert_to_fp32)

    if strategy == "none":
        text_out, out, text_lse, lse = _local_inner(q, k, v, key_padding_mask, joint_q, joint_k, joint_v,
                                                    joint_key_padding_mask, scale=scale, return_lse=return_lse,
                                                    backend=backend)
    else:
        lens = _lengths_from_context(mesh, q.shape[1])
        if lens is not None:  # the sp_plan hooks split this sequence: every rank knows all lengths
            any_mask = key_padding_mask is not None
        else:
            lens, any_mask = _exchange_lengths(mesh, q.shape[1], key_padding_mask is not None)
        needs_mask = any_mask or len(set(lens)) > 1
        if needs_mask and key_padding_mask is None:
            key_padding_mask = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
        if not needs_mask:
            key_padding_mask = None
        u, r = mesh.ulysses.world_size, mesh.ring.world_size
        ring_rank = mesh.ring.rank_in_group
        if u > 1 and list(mesh.ulysses.ranks) != list(mesh.sp.ranks[ring_rank * u:(ring_rank + 1) * u]):
            raise SPAttentionError(f"mesh layout: ulysses group {mesh.ulysses.ranks} is not the contiguous block "
                                   f"{ring_rank} of the sp group {mesh.sp.ranks}; sequence order would be wrong")
        if r > 1:
            ring_lens = [(u * max(lens[i * u:(i + 1) * u])) if u > 1 else lens[i] for i in range(r)]
            inner = partial(_ring_inner, ring_lens=ring_lens, group=mesh.ring, scale=scale, return_lse=return_lse,
                            convert_to_fp32=fp32, backend=backend)
        else:
            inner = partial(_local_inner, scale=scale, return_lse=return_lse, backend=backend)
        if u > 1:
            text_out, out, text_lse, lse = ulysses_attention(
                q, k, v, key_mask=key_padding_mask, lens=lens[ring_rank * u:(ring_rank + 1) * u], group=mesh.ulysses,
                inner=inner, joint_q=joint_q, joint_k=joint_k, joint_v=joint_v,
                joint_key_mask=joint_key_padding_mask, return_lse=return_lse)
        else:
            text_out, out, text_lse, lse = inner(q, k, v, key_padding_mask, joint_q, joint_k, joint_v,
                                                 joint_key_padding_mask)

    if text_out is not None:
        parts = [text_out, out] if joint_strategy == "front" else [out, text_out]
        out = cat_views(parts, dim=1)  # local "front": the two halves of one output again, no copy
        if return_lse:
            lparts = [text_lse, lse] if joint_strategy == "front" else [lse, text_lse]
            lse = cat_views(lparts, dim=1)
    return (out, lse) if return_lse else out
