"""The few collectives the attention strategies need, with a count of the bytes each rank sends.

Thin wrappers over ``parallel.collectives`` (``all_to_all_4D``/``5D``, ``RingComm``).
``bytes_sent`` counts what leaves this rank (the part of an all-to-all that a rank
keeps for itself is not counted), so a benchmark can compare it with each
strategy's theoretical minimum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from omni_runtime.parallel.collectives import RingComm, all_to_all_4D, all_to_all_5D

logger = logging.getLogger(__name__)


@dataclass
class CommStats:
    bytes_sent: int = 0
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_sent += int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def reset(self) -> None:
        self.bytes_sent = 0
        self.calls.clear()


_STATS = CommStats()


def get_comm_stats() -> CommStats:
    """Bytes this process sent through the attention collectives since the last ``reset()``."""
    return _STATS


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_to_all_qkv(qkv: torch.Tensor, group: dist.ProcessGroup, world_size: int) -> torch.Tensor:
    """(b, s/P, 3, H, D) -> (b, s, 3, H/P, D) through ``all_to_all_5D``, counting the bytes."""
    _STATS.add("all_to_all", _nbytes(qkv) * (world_size - 1) // world_size)
    return all_to_all_5D(qkv, scatter_idx=3, gather_idx=1, group=group)


def all_to_all_out(x: torch.Tensor, group: dist.ProcessGroup, world_size: int) -> torch.Tensor:
    """(b, s, H/P, D) -> (b, s/P, H, D) through ``all_to_all_4D``, counting the bytes."""
    _STATS.add("all_to_all", _nbytes(x) * (world_size - 1) // world_size)
    return all_to_all_4D(x, scatter_idx=1, gather_idx=2, group=group)


def all_gather_dim0(x: torch.Tensor, group: dist.ProcessGroup, world_size: int) -> torch.Tensor:
    """Stack of ``x`` from every rank of the group: (world, *x.shape)."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=group)
    _STATS.add("all_gather", _nbytes(x) * (world_size - 1))
    return torch.stack(parts)


class CountingRingComm(RingComm):
    """``RingComm`` that counts the bytes it sends."""

    def send_recv(self, to_send: torch.Tensor, recv_tensor: torch.Tensor | None = None) -> torch.Tensor:
        _STATS.add("ring_send", _nbytes(to_send))
        return super().send_recv(to_send, recv_tensor)
