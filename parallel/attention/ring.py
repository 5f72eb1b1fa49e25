"""Ring attention: K/V blocks travel around the ring group; partial outputs merge by their LSE.

Each rank keeps its queries (plus the replicated text queries, which must see every
image key too) and, over ``ring`` steps, sees every rank's K/V block. Partial
outputs are merged with their log-sum-exp in float32 (``convert_to_fp32``) or in
the input dtype. Uneven block lengths are padded to the ring maximum and the pad is
masked; the mask travels with its block. Replicated text K/V form one extra block
merged exactly once, so text keys are counted once in the softmax; the text key mask
(padding text tokens) applies to that block only and never travels.
"""

from __future__ import annotations

import logging

import torch

from omni_runtime.parallel.attention.backends import attention_block
from omni_runtime.parallel.attention.lse_merge import merge_partial
from omni_runtime.parallel.collectives import RingComm
from omni_runtime.parallel.utils import pad_dim

logger = logging.getLogger(__name__)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None,
    lens: list[int],
    group,
    joint_q: torch.Tensor | None = None,
    joint_k: torch.Tensor | None = None,
    joint_v: torch.Tensor | None = None,
    joint_key_mask: torch.Tensor | None = None,
    scale: float,
    return_lse: bool = False,
    convert_to_fp32: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Ring attention over ``group`` (a GroupCoordinator; K/V travel through its communicator's batched p2p).

    q/k/v: (batch, local_seq, heads, head_dim). ``lens``: the local K length of each ring
    rank, by rank in group. ``key_mask`` (batch, local_seq) bool or None; it must be given
    on every rank or on none. ``joint_key_mask`` (batch, text) bool: the real text keys of the
    joint block (None: all). Returns ``(text_out, image_out, text_lse, image_lse)``.
    """
    world = group.world_size
    text_len = 0 if joint_q is None else joint_q.shape[1]
    queries = q if joint_q is None else torch.cat([joint_q, q], dim=1)
    if q.dtype == torch.float64:
        acc_dtype = torch.float64
    else:
        acc_dtype = torch.float32 if convert_to_fp32 else q.dtype

    s_max = max(lens)
    kv = torch.stack([pad_dim(k, 1, s_max), pad_dim(v, 1, s_max)]).contiguous()
    mask = None
    if key_mask is not None:
        mask = pad_dim(key_mask, 1, s_max, False).to(torch.uint8).contiguous()

    comm = RingComm(group)
    spare_kv = torch.empty_like(kv)
    spare_mask = None if mask is None else torch.empty_like(mask)
    out = lse = None
    for step in range(world):
        if step + 1 < world:
            comm.send_recv(kv, spare_kv)
            if mask is not None:
                comm.send_recv(mask, spare_mask)
            comm.commit()
        block_mask = None
        if mask is not None:
            block_mask = mask.bool()
            if bool(block_mask.all()):
                block_mask = None
        bo, bl = attention_block(queries, kv[0], kv[1], key_mask=block_mask, scale=scale, return_lse=True,
                                 backend=backend)
        out, lse = merge_partial(out, lse, bo, bl, acc_dtype=acc_dtype)
        if step + 1 < world:
            comm.wait()
            kv, spare_kv = spare_kv, kv
            if mask is not None:
                mask, spare_mask = spare_mask, mask
    if joint_k is not None:
        bo, bl = attention_block(queries, joint_k, joint_v, key_mask=joint_key_mask, scale=scale, return_lse=True,
                                 backend=backend)
        out, lse = merge_partial(out, lse, bo, bl, acc_dtype=acc_dtype)

    out = out.to(q.dtype)
    text_out = out[:, :text_len] if text_len else None
    image_out = out[:, text_len:]
    if not return_lse:
        return text_out, image_out, None, None
    return text_out, image_out, (lse[:, :text_len] if text_len else None), lse[:, text_len:]
