"""``Attention``: the module models use — a backend × the sequence-parallel mesh a strategy bound into it."""

from __future__ import annotations

import logging

import torch
from torch import nn

from omni_runtime.parallel.attention.backends import BACKEND_NAMES, AttentionBackendError
from omni_runtime.parallel.attention.sp_attention import SPMesh, sp_attention

logger = logging.getLogger(__name__)


class Attention(nn.Module):
    """Scaled dot-product attention over (batch, seq, heads, head_dim) shards.

    Like a diffusers attention processor, the layer holds its parallel state: until a strategy binds a mesh
    (:meth:`bind_mesh`, done by ``parallel.strategies.SequenceParallel.apply`` at load) it is plain local
    attention; with a bound :class:`SPMesh` the strategy (Ulysses, Ring, hybrid) follows that mesh's degrees.
    ``backend`` pins a backend (``sdpa``, ``flash_cpu``, ``flash_attn``, ``math``, ``scores``); None picks the fastest that
    fits. ``sequence_parallel=False`` keeps this layer local under a mesh (for inputs that are not sequence shards,
    e.g. text-only attention): strategies do not bind it.
    """

    def __init__(self, backend: str | None = None, scale: float | None = None,
                 convert_to_fp32: bool | None = None, sequence_parallel: bool = True) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel
        if backend is not None and backend not in BACKEND_NAMES:
            raise AttentionBackendError(f"Attention(backend={backend!r}) is unknown; allowed: {BACKEND_NAMES}")
        self.backend = backend
        self.scale = scale
        self.convert_to_fp32 = convert_to_fp32
        self.sp_mesh: SPMesh | None = None

    def bind_mesh(self, sp_mesh: SPMesh | None) -> None:
        """Run over ``sp_mesh`` from now on (None: local again). Layers with ``sequence_parallel=False`` stay local."""
        self.sp_mesh = sp_mesh if self.sequence_parallel else None

    @property
    def strategy(self) -> str:
        return "none" if self.sp_mesh is None else self.sp_mesh.strategy

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        joint_q: torch.Tensor | None = None,
        joint_k: torch.Tensor | None = None,
        joint_v: torch.Tensor | None = None,
        joint_strategy: str = "none",
        key_padding_mask: torch.Tensor | None = None,
        joint_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``key_padding_mask`` (batch, local_seq) / ``joint_key_padding_mask`` (batch, text_seq) bool, True = a real
        image / text token: the others are no key (their query outputs are still returned)."""
        return sp_attention(q, k, v, joint_q=joint_q, joint_k=joint_k, joint_v=joint_v,
                            joint_strategy=joint_strategy, key_padding_mask=key_padding_mask,
                            joint_key_padding_mask=joint_key_padding_mask, scale=self.scale,
                            backend=self.backend, convert_to_fp32=self.convert_to_fp32,
                            mesh=self.sp_mesh, local=not self.sequence_parallel)

    def extra_repr(self) -> str:
        return f"backend={self.backend or 'auto'}, sequence_parallel={self.sequence_parallel}"
