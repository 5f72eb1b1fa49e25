"""Ulysses attention: all-to-all turns sequence shards into head shards and back.

Before attention every rank of the Ulysses group holds ``local_seq`` tokens of all
heads; after one all-to-all (q, k, v packed in one message) it holds the group's
whole sequence for ``ceil(heads / ulysses)`` heads. Head counts the degree does not
divide are padded with zero heads that are dropped afterwards; uneven local lengths
are padded to the group maximum inside the collective, masked as keys, and cut
again on the way back, so no pad reaches the caller. Replicated text tokens need no
communication on the way in (each rank slices its heads); their output is
all-gathered over heads on the way out. The text key mask (batch, text) is the same
for every head, so it reaches ``inner`` as it is. Attention on the gathered sequence is done
by ``inner`` — plain local attention, or Ring attention for the hybrid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from omni_runtime.parallel.collectives import all_to_all_4D, all_to_all_5D
from omni_runtime.parallel.utils import pad_dim

logger = logging.getLogger(__name__)

# inner(q, k, v, key_mask, joint_q, joint_k, joint_v, joint_key_mask) -> (text_out, image_out, text_lse, image_lse)
InnerAttention = Callable[..., tuple]


def _gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Stack of ``x`` from every rank of the group: (world, *x.shape), through the group's communicator."""
    return group.all_gather(x.contiguous().unsqueeze(0), dim=0)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None,
    lens: list[int],
    group,
    inner: InnerAttention,
    joint_q: torch.Tensor | None = None,
    joint_k: torch.Tensor | None = None,
    joint_v: torch.Tensor | None = None,
    joint_key_mask: torch.Tensor | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Ulysses over ``group`` (a GroupCoordinator: its communicator runs the all-to-alls and gathers).

    ``lens``: local sequence length of each group member, by rank in group. ``key_mask`` must
    be given on every rank or on none. ``joint_key_mask`` (batch, text) bool: the real text keys
    (None: all), identical on every rank. Returns ``(text_out, image_out, text_lse, image_lse)``
    in the caller's layout (batch, seq, heads[, head_dim]).
    """
    world, me = group.world_size, group.rank_in_group
    b, s_local, heads, d = q.shape
    s_max = max(lens)
    hc = -(-heads // world)
    hp = hc * world

    # (b, s, 3, H, D) padded to (b, s_max, 3, hp, D) -> (b, U*s_max, 3, hc, D)
    qkv = pad_dim(pad_dim(torch.stack([q, k, v], dim=2), 1, s_max), 3, hp)
    got = all_to_all_5D(qkv, scatter_idx=3, gather_idx=1, group=group)
    fq, fk, fv = got.unbind(2)

    full_mask = None
    if key_mask is not None:
        m = pad_dim(key_mask, 1, s_max, False).to(torch.uint8)
        full_mask = _gather_dim0(m, group).permute(1, 0, 2).reshape(b, world * s_max).bool()

    jq = jk = jv = None
    if joint_q is not None:
        sl = slice(me * hc, (me + 1) * hc)
        jq, jk, jv = (pad_dim(t, 2, hp)[:, :, sl] for t in (joint_q, joint_k, joint_v))

    # the text tokens are whole here (only their heads are split): their key mask passes through unchanged
    text_out, image_out, text_lse, image_lse = inner(fq, fk, fv, full_mask, jq, jk, jv,
                                                     joint_key_mask if jq is not None else None)

    # (b, U*s_max, hc, D) -> (b, s_max, hp, D), then drop the pad rows and heads
    out = all_to_all_4D(image_out.contiguous(), scatter_idx=1, gather_idx=2, group=group)[:, :s_local, :heads]
    lse_out = None
    if return_lse:
        lse_out = all_to_all_4D(image_lse.unsqueeze(-1).contiguous(), scatter_idx=1, gather_idx=2,
                                group=group)[:, :s_local, :heads, 0]

    t_out = t_lse = None
    if text_out is not None:
        t = text_out.shape[1]
        t_out = _gather_dim0(text_out, group).permute(1, 2, 0, 3, 4).reshape(b, t, hp, d)[:, :, :heads]
        if return_lse:
            t_lse = _gather_dim0(text_lse, group).permute(1, 2, 0, 3).reshape(b, t, hp)[:, :, :heads]
    return t_out, out, t_lse, lse_out
