"""Merging partial attention results with their log-sum-exp (the heart of Ring attention).

Two blocks of keys seen by the same query row give ``(o1, l1)`` and ``(o2, l2)``;
attention over the union is ``o = o1 * exp(l1 - l) + o2 * exp(l2 - l)`` with
``l = logaddexp(l1, l2)``. A block with no visible keys has ``l = -inf`` and must
add nothing, also when every block so far is empty (no NaN from ``-inf - -inf``).
"""

from __future__ import annotations

import torch


def merge_partial(
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
    *,
    acc_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block ``(block_out (b, s, h, d), block_lse (b, s, h))`` into the running result.

    The running ``out`` is kept in ``acc_dtype`` (float32 unless the caller opts out);
    ``lse`` always stays in at least float32.
    """
    lse_t = torch.float64 if block_lse.dtype == torch.float64 else torch.float32
    block_lse = block_lse.to(lse_t)
    block_out = block_out.to(acc_dtype)
    if out is None or lse is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    finite = torch.where(torch.isneginf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_old = torch.exp(lse - finite).unsqueeze(-1)
    w_new = torch.exp(block_lse - finite).unsqueeze(-1)
    merged = out * w_old.to(acc_dtype) + block_out * w_new.to(acc_dtype)
    return merged, new_lse
