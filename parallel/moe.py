"""``MoEFeedForward``: a top-k routed SwiGLU mixture of experts with an optional shared expert.

The shape of HiDream-I1's MoE FFN (``MOEFeedForwardSwiGLU``): a router ``gate`` (a bias-free linear to one
logit per expert, softmax, top-k), routed experts ``experts.{e}`` and a ``shared_experts`` SwiGLU every token
goes through; every SwiGLU is ``w2(silu(w1 x) * w3 x)`` without biases. Parameter names follow that layout.

Expert parallelism: built with an EP group of ``N`` ranks, rank ``r`` creates (and so loads) only the experts
:func:`~omni_runtime.parallel.all2all.local_expert_range` ``(num_experts, N, r)``; the router and the shared
expert are replicated. A forward routes on every rank, then ``dispatch`` → local experts → ``combine`` through
the all2all manager of the group's communicator.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_runtime.parallel.all2all.base import All2AllError, local_expert_range

logger = logging.getLogger(__name__)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEGate(nn.Module):
    """Router: softmax over one logit per expert, keep the ``top_k`` best (optionally renormalised)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, norm_topk_prob: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim ** -0.5)
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights (tokens, k) in x's dtype, topk_ids (tokens, k) int64) for flat tokens ``x``."""
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)
        weights, ids = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return weights.to(x.dtype), ids


class MoEFeedForward(nn.Module):
    """Routed SwiGLU experts (+ optional shared expert); expert-parallel over ``ep_group`` when it has > 1 rank.

    Args:
        dim: token width.
        num_experts: routed experts in the whole model.
        top_k: experts per token.
        hidden_dim: width of each routed expert's SwiGLU (the shared expert's too).
        shared_expert: add a SwiGLU every token goes through.
        ep_group: the expert-parallel ``GroupCoordinator`` (its communicator must carry an all2all manager when it
            has more than one rank); ``None``: every expert here.
        is_sequence_parallel: passed to ``dispatch``/``combine`` (see ``parallel.all2all.base``).
    """

    is_moe_layer = True

    def __init__(self, dim: int, num_experts: int, top_k: int, hidden_dim: int, *, shared_expert: bool = True,
                 norm_topk_prob: bool = False, ep_group: Any = None, is_sequence_parallel: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise All2AllError(f"moe top_k = {top_k}: must be between 1 and num_experts = {num_experts}")
        self.hidden_size = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.ep_group = ep_group
        self.is_sequence_parallel = is_sequence_parallel
        ep_size = getattr(ep_group, "world_size", 1)
        ep_rank = getattr(ep_group, "rank_in_group", 0)
        self.local_experts = local_expert_range(num_experts, ep_size, ep_rank)
        self.gate = MoEGate(dim, num_experts, top_k, norm_topk_prob)
        self.experts = nn.ModuleDict({str(e): SwiGLU(dim, hidden_dim) for e in self.local_experts})
        self.shared_experts = SwiGLU(dim, hidden_dim) if shared_expert else None

    @property
    def expert_parallel(self) -> bool:
        return getattr(self.ep_group, "world_size", 1) > 1

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, local_experts="
                f"[{self.local_experts.start}, {self.local_experts.stop})")

    def experts_forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
        """``sum_k topk_weights[:, k] * expert_{topk_ids[:, k]}(x)`` over this rank's experts only (others: 0)."""
        out = torch.zeros_like(hidden_states)
        for e in self.local_experts:
            hit = topk_ids == e
            rows = torch.nonzero(hit.any(dim=1)).flatten()
            if rows.numel() == 0:
                continue
            w = (topk_weights * hit).sum(dim=1)[rows].to(hidden_states.dtype)
            out.index_add_(0, rows, self.experts[str(e)](hidden_states[rows]) * w[:, None])
        return out

    def experts_forward_expert_major(self, recv_x: torch.Tensor, recv_count: torch.Tensor) -> torch.Tensor:
        """The expert-major layout of DeepEP low-latency: ``recv_x[i, :recv_count[i]]`` are the tokens of local
        expert ``i``; each gets that expert's output, unweighted (the combine applies the top-k weights)."""
        if recv_x.shape[0] != len(self.local_experts):
            raise All2AllError(f"expert-major dispatch gave {recv_x.shape[0]} experts, this rank holds "
                               f"{len(self.local_experts)}")
        out = torch.zeros_like(recv_x)
        for i, (e, n) in enumerate(zip(self.local_experts, recv_count.tolist(), strict=True)):
            if n:
                out[i, :n] = self.experts[str(e)](recv_x[i, :n])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        topk_weights, topk_ids = self.gate(tokens)
        if self.expert_parallel:
            comm = self.ep_group.device_communicator
            h, w, ids = comm.dispatch(tokens, topk_weights, topk_ids, self.is_sequence_parallel)
            if getattr(comm.all2all_manager, "expert_major", False):  # h: (local experts, rows, hidden), w: counts
                routed = comm.combine(self.experts_forward_expert_major(h, w), self.is_sequence_parallel)
            else:
                routed = comm.combine(self.experts_forward(h, w, ids), self.is_sequence_parallel)
        else:
            routed = self.experts_forward(tokens, topk_weights, topk_ids)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(tokens)
        return routed.reshape(shape)


def is_local_expert_key(key: str, num_experts: int, ep_size: int, ep_rank: int) -> bool:
    """False for a checkpoint key ``...experts.{e}...`` of an expert this EP rank does not hold."""
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "experts" and parts[i + 1].isdigit():
            return int(parts[i + 1]) in local_expert_range(num_experts, ep_size, ep_rank)
    return True
