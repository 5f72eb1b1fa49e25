"""Relative errors of tensors against a reference, as the attention tests measure them (float64)."""

from __future__ import annotations

import math

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms, float64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rel_lse(a: torch.Tensor, b: torch.Tensor) -> float:
    """``rel`` over the rows with visible keys; the -inf rows (no visible key) must match exactly (else inf)."""
    dead = torch.isneginf(b)
    if not torch.equal(torch.isneginf(a), dead) or bool(torch.isnan(a).any()):
        return math.inf
    return rel(a[~dead], b[~dead]) if bool((~dead).any()) else 0.0
