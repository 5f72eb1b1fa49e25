"""Attention with materialized scores: ``softmax(q k^T * scale) v`` as two matmuls around an in-place softmax.

An alternative to the CPU flash kernel for the sequence lengths a CPU serves: two oneDNN matmuls (the scores, then
the weighted values) around a softmax over the whole score matrix. The two matmuls alone can beat the flash kernel
(bf16 on this project's 2-core host: 2.6 ms against 3.6 ms at 768 tokens x 6 heads), but the softmax's passes
over the materialized matrix cost more than that: measured with ``tools/bench_attention.py --backends`` (fp32, 64
to 2048 tokens x 6 heads x 64) it took 1.5-3.5x the flash kernel's time at every size, so ``SCORES_MAX_BYTES`` is
0 and ``auto`` never picks it on this host (docs/BENCHMARKS.md "CPU attention backend"). A host where it wins sets
the limit from the same benchmark; ``Attention(backend="scores")`` / ``attention_block(..., backend="scores")``
select it explicitly.

Layout (batch, seq, heads, head_dim) like every backend. The scores are computed in float32 (float64 for float64
inputs; bf16/fp16 inputs are upcast), so the result is the math backend's up to matmul rounding. The key mask
(batch, k_seq) bool (True = a real key) is applied to the scores; a row with no visible key gets ``out = 0`` and
``lse = -inf``. The log-sum-exp comes out of the same softmax (the row max plus the log of the row sum), which
is what Ring attention merges.
"""

from __future__ import annotations

import torch

# Score bytes per call up to which ``auto`` picks this backend on CPU (past it: the flash kernel); 0: never (the
# measurement on this host, above). A limit worth trying elsewhere is 32 MiB, glibc's largest mmap threshold
# (runtime/allocator.py): a score matrix up to it is reused from the heap, one above it is fresh pages every call.
SCORES_MAX_BYTES = 0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the scores and of every backend's LSE: float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def score_bytes(q: torch.Tensor, k_len: int | None = None) -> int:
    """Bytes of the score matrix (batch, heads, q_seq, k_seq) one call materializes."""
    b, sq, h, _ = q.shape
    sk = sq if k_len is None else k_len
    return b * h * sq * sk * torch.empty((), dtype=compute_dtype(q.dtype)).element_size()


def scores_fit(q: torch.Tensor, k_len: int | None = None, limit: int | None = None) -> bool:
    """Whether ``auto`` should materialize the scores of this call: CPU tensors within ``limit`` bytes (None:
    ``SCORES_MAX_BYTES``; 0: never)."""
    limit = SCORES_MAX_BYTES if limit is None else limit
    return q.device.type == "cpu" and 0 < limit and score_bytes(q, k_len) <= limit


def scores_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None,
    scale: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out (b, sq, h, d_v) in q's dtype, lse (b, sq, h) in the compute dtype or None)``; non-empty inputs."""
    ct = compute_dtype(q.dtype)
    qh = q.transpose(1, 2).to(ct) * scale  # (b, h, sq, d): scaling q is cheaper than scaling the scores
    kh, vh = k.transpose(1, 2).to(ct), v.transpose(1, 2).to(ct)
    s = torch.matmul(qh, kh.transpose(-1, -2))  # (b, h, sq, sk)
    if key_mask is not None:
        s.masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    if key_mask is not None:
        m = m.masked_fill(torch.isneginf(m), 0.0)  # rows with no visible key: exp(-inf - 0) = 0, not NaN
    s.sub_(m).exp_()
    z = s.sum(dim=-1, keepdim=True)
    out = torch.matmul(s, vh).div_(z.clamp_min(torch.finfo(ct).tiny))  # normalize the (small) output, not s
    lse = (m + z.log()).squeeze(-1).transpose(1, 2)  # log(0) = -inf for rows with no visible key
    # one path with or without the LSE: a layer's output does not depend on whether its caller asked for it
    return out.transpose(1, 2).to(q.dtype), (lse if return_lse else None)
