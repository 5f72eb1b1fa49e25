"""Parallel attention: one ``Attention`` = backend (SDPA, CPU flash with LSE, flash-attn) × strategy
(none, Ulysses, Ring, Ulysses×Ring) over the mesh a strategy bound into it. ``sp_attention`` is the functional form."""

from omni_runtime.parallel.attention.backends import (
    AttentionBackendError,
    attention_block,
    flash_attn_available,
)
from omni_runtime.parallel.attention.layer import Attention
from omni_runtime.parallel.attention.sp_attention import SPAttentionError, SPMesh, sp_attention
from omni_runtime.parallel.attention.sp_context import (
    SPForwardContext,
    get_sp_forward_context,
    sp_forward_context,
)

__all__ = [
    "Attention", "AttentionBackendError", "SPAttentionError", "SPForwardContext", "SPMesh", "attention_block",
    "flash_attn_available", "get_sp_forward_context", "sp_attention", "sp_forward_context",
]
