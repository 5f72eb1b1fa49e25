"""Attention backends: one block of softmax attention, optionally with its log-sum-exp.

Every backend works in the (batch, seq, heads, head_dim) layout and takes an
optional boolean key padding mask (batch, k_seq), True = a real key. With
``return_lse=True`` it returns ``(out, lse)`` where ``lse`` is (batch, q_seq,
heads) in float32 (float64 for float64 inputs): the natural log of the softmax
denominator of each query row. A row whose keys are all masked (or a block with
no keys) has ``out == 0`` and ``lse == -inf`` so that merging it with other
blocks adds nothing.

Backends:
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (no LSE);
- ``flash_cpu``: ``aten._scaled_dot_product_flash_attention_for_cpu``, returns the LSE;
- ``flash_attn``: ``flash_attn_func`` when the package imports and tensors are on CUDA;
- ``math``: explicit softmax in float32/float64, any device; the fallback and the test reference;
- ``scores``: materialized scores on CPU (``scores.py``): two oneDNN matmuls around an in-place softmax, with the
  LSE; ``auto`` picks it on CPU while the score matrix is at most ``SCORES_MAX_BYTES`` (0 on the measured host:
  never; the flash kernel past it).
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import torch
import torch.nn.functional as F

from omni_runtime.parallel.attention.scores import compute_dtype, scores_attention, scores_fit

logger = logging.getLogger(__name__)

try:  # guarded: flash-attn is optional and CUDA-only
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - depends on the machine
    _flash_attn_func = None

BACKEND_NAMES = ("sdpa", "flash_cpu", "flash_attn", "math", "scores")


class AttentionBackendError(ValueError):
    """A backend was asked for something it cannot do (names the field, the value, what is allowed)."""


class AttentionBackend(Protocol):
    name: str

    def supports(self, q: torch.Tensor, *, need_lse: bool, has_mask: bool) -> bool: ...

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        key_mask: torch.Tensor | None,
        scale: float,
        return_lse: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def _empty_result(q: torch.Tensor, v: torch.Tensor, return_lse: bool):
    b, sq, h, _ = q.shape
    out = q.new_zeros(b, sq, h, v.shape[-1])
    if not return_lse:
        return out
    return out, torch.full((b, sq, h), float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)


def _mask_fully_masked(out: torch.Tensor, lse: torch.Tensor, key_mask: torch.Tensor | None):
    """Rows whose keys are all masked: out 0, lse -inf (kernels differ in what they return)."""
    if key_mask is None:
        return out, lse
    dead = ~key_mask.any(dim=-1)  # (batch,)
    if bool(dead.any()):
        out = out.masked_fill(dead[:, None, None, None], 0.0)
        lse = lse.masked_fill(dead[:, None, None], float("-inf"))
    return out, lse


class SDPABackend:
    name = "sdpa"

    def supports(self, q: torch.Tensor, *, need_lse: bool, has_mask: bool) -> bool:
        return not need_lse

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None,
                 scale: float, return_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if return_lse:
            raise AttentionBackendError("backend 'sdpa' cannot return the log-sum-exp; use 'flash_cpu', "
                                        "'flash_attn' or 'math'")
        if q.shape[1] == 0 or k.shape[1] == 0:
            return _empty_result(q, v, False)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=scale)
        out = out.transpose(1, 2)
        if key_mask is not None:
            out, _ = _mask_fully_masked(out, out.new_zeros(out.shape[:3]), key_mask)
        return out


class CPUFlashBackend:
    """The CPU flash kernel; layout (b, h, s, d) in, (out (b, h, s, d), lse (b, h, s)) out.

    On torch 2.13 it needs an additive float mask of the query dtype (bool masks are
    refused), returns ``out = 0, lse = 0`` for fully masked rows, and crashes the
    process (SIGFPE) on zero-length queries or keys: both are handled here.
    """

    name = "flash_cpu"

    def supports(self, q: torch.Tensor, *, need_lse: bool, has_mask: bool) -> bool:
        return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16,
                                                      torch.float16)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None,
                 scale: float, return_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if q.shape[1] == 0 or k.shape[1] == 0:
            return _empty_result(q, v, return_lse)
        mask = None
        if key_mask is not None:
            mask = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(~key_mask, float("-inf"))[:, None, None, :]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, attn_mask=mask, scale=scale)
        out = out.transpose(1, 2)
        lse = lse.transpose(1, 2).to(compute_dtype(q.dtype))
        out, lse = _mask_fully_masked(out, lse, key_mask)
        return (out, lse) if return_lse else out


class FlashAttnBackend:
    """flash-attn 2 (``flash_attn_func``), CUDA fp16/bf16, no key mask."""

    name = "flash_attn"

    def supports(self, q: torch.Tensor, *, need_lse: bool, has_mask: bool) -> bool:
        return (_flash_attn_func is not None and q.is_cuda and not has_mask
                and q.dtype in (torch.float16, torch.bfloat16))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None,
                 scale: float, return_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if _flash_attn_func is None:
            raise AttentionBackendError("backend 'flash_attn' needs the flash-attn package, which is not importable")
        if key_mask is not None:
            raise AttentionBackendError("backend 'flash_attn' takes no key_padding_mask; use 'math' or 'sdpa'")
        if q.shape[1] == 0 or k.shape[1] == 0:
            return _empty_result(q, v, return_lse)
        res = _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False,
                               return_attn_probs=return_lse)
        if not return_lse:
            return res
        out, lse = res[0], res[1]
        return out, lse.transpose(1, 2).float()


class ScoresBackend:
    """Materialized scores on CPU (``scores.scores_attention``): any float dtype, masks, LSE."""

    name = "scores"

    def supports(self, q: torch.Tensor, *, need_lse: bool, has_mask: bool) -> bool:
        return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None,
                 scale: float, return_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if q.shape[1] == 0 or k.shape[1] == 0:
            return _empty_result(q, v, return_lse)
        out, lse = scores_attention(q, k, v, key_mask=key_mask, scale=scale, return_lse=return_lse)
        if not return_lse:
            return out
        return _mask_fully_masked(out, lse.to(compute_dtype(q.dtype)), key_mask)


class MathBackend:
    """Explicit softmax, computed in float32 (float64 for float64 inputs)."""

    name = "math"

    def supports(self, q: torch.Tensor, *, need_lse: bool, has_mask: bool) -> bool:
        return True

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None,
                 scale: float, return_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if q.shape[1] == 0 or k.shape[1] == 0:
            return _empty_result(q, v, return_lse)
        ct = compute_dtype(q.dtype)
        s = torch.einsum("bqhd,bkhd->bhqk", q.to(ct), k.to(ct)) * scale
        if key_mask is not None:
            s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # (b, h, q)
        p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
        out = torch.einsum("bhqk,bkhd->bqhd", p, v.to(ct)).to(q.dtype)
        lse = lse.transpose(1, 2)
        out, lse = _mask_fully_masked(out, lse, key_mask)
        return (out, lse) if return_lse else out


_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": SDPABackend(),
    "flash_cpu": CPUFlashBackend(),
    "flash_attn": FlashAttnBackend(),
    "math": MathBackend(),
    "scores": ScoresBackend(),
}


def flash_attn_available() -> bool:
    return _flash_attn_func is not None


def get_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        raise AttentionBackendError(f"attention backend {name!r} is unknown; allowed: {', '.join(BACKEND_NAMES)}")
    return _BACKENDS[name]


def select_backend(q: torch.Tensor, *, need_lse: bool, has_mask: bool, name: str | None = None,
                   k_len: int | None = None, scores_max_bytes: int | None = None) -> AttentionBackend:
    """The named backend (checked), or the fastest one that can do the job.

    ``k_len``: the key length (default: the query length); with it, ``auto`` on CPU takes ``scores`` while the
    score matrix is at most ``scores_max_bytes`` (None: ``SCORES_MAX_BYTES``), the flash kernel (or SDPA) past it."""
    if name is not None:
        backend = get_backend(name)
        if not backend.supports(q, need_lse=need_lse, has_mask=has_mask):
            raise AttentionBackendError(
                f"attention backend {name!r} cannot run on device={q.device.type} dtype={q.dtype} "
                f"with need_lse={need_lse} has_mask={has_mask}")
        return backend
    if (_BACKENDS["scores"].supports(q, need_lse=need_lse, has_mask=has_mask)
            and scores_fit(q, k_len, scores_max_bytes)):
        return _BACKENDS["scores"]
    order = ("flash_attn", "flash_cpu", "math") if need_lse else ("flash_attn", "sdpa")
    for candidate in order:
        backend = _BACKENDS[candidate]
        if backend.supports(q, need_lse=need_lse, has_mask=has_mask):
            return backend
    return _BACKENDS["math"]


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def attention_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one block of keys, (batch, seq, heads, head_dim) layout."""
    if scale is None:
        scale = default_scale(q.shape[-1])
    impl = select_backend(q, need_lse=return_lse, has_mask=key_mask is not None, name=backend, k_len=k.shape[1])
    return impl(q, k, v, key_mask=key_mask, scale=scale, return_lse=return_lse)
