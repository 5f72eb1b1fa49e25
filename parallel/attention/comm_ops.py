"""The few collectives the attention strategies need, with a count of the bytes each rank sends.

Private to ``parallel.attention``: the layouts here (uneven lengths padded to the
group maximum, q/k/v packed into one message) are the strategies' own; the
generic ``all_to_all_4D`` / ``RingComm`` live in ``parallel.collectives``.
``bytes_sent`` counts what leaves this rank (the part of an all-to-all that a rank
keeps for itself is not counted), so a benchmark can compare it with each
strategy's theoretical minimum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

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


def all_to_all_dim0(x: torch.Tensor, group: dist.ProcessGroup, world_size: int) -> torch.Tensor:
    """``out[j] = x_on_rank_j[my_rank]``: x is (world, ...) contiguous; returns the same shape."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    _STATS.add("all_to_all", _nbytes(x) * (world_size - 1) // world_size)
    return out


def all_gather_dim0(x: torch.Tensor, group: dist.ProcessGroup, world_size: int) -> torch.Tensor:
    """Stack of ``x`` from every rank of the group: (world, *x.shape)."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=group)
    _STATS.add("all_gather", _nbytes(x) * (world_size - 1))
    return torch.stack(parts)


class RingExchange:
    """Send to the next rank of the ring and receive from the previous one, asynchronously."""

    def __init__(self, group: dist.ProcessGroup, ranks: list[int], rank_in_group: int) -> None:
        self.group = group
        n = len(ranks)
        self.send_to = ranks[(rank_in_group + 1) % n]
        self.recv_from = ranks[(rank_in_group - 1) % n]
        self._ops: list[dist.P2POp] = []
        self._reqs: list = []

    def send_recv(self, to_send: torch.Tensor, recv_into: torch.Tensor) -> torch.Tensor:
        self._ops.append(dist.P2POp(dist.isend, to_send, self.send_to, group=self.group))
        self._ops.append(dist.P2POp(dist.irecv, recv_into, self.recv_from, group=self.group))
        _STATS.add("ring_send", _nbytes(to_send))
        return recv_into

    def commit(self) -> None:
        if self._ops:
            self._reqs = dist.batch_isend_irecv(self._ops)
            self._ops = []

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._reqs = []
