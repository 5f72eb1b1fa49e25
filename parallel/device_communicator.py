"""Tensor collectives of one rank group, on torch.distributed (gloo on CPU, nccl on CUDA).

``DeviceCommunicatorBase`` is the one communication seam: every tensor collective of the project goes through
one of these — ``GroupCoordinator``'s gathers and broadcasts, the Ulysses all-to-all (``parallel.collectives``),
the Ring's batched point-to-point exchange (``RingComm``). A platform communicator (custom all-reduce, pynccl,
symmetric memory) or an MoE all2all manager replaces the plain ``torch.distributed`` calls here, once.
All ``src`` / ``dst`` arguments are ranks *in the group*; they are mapped to global ranks here because gloo's
point-to-point and rooted collectives address peers by global rank.

Each communicator counts the bytes this rank sends through it (:class:`CommStats`, ``communicator.stats``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

logger = logging.getLogger(__name__)

# torch >= 2.10 renamed the single-tensor collectives; the old names still work but warn.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommStats:
    """Bytes this rank sent through one communicator, and calls per kind, since the last :meth:`reset`.

    A collective counts what leaves this rank: for an all-to-all the part a rank keeps for itself is not counted,
    for an all-gather ``(world - 1)`` copies of the input, for a point-to-point send its tensor.
    """

    bytes_sent: int = 0
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_sent += int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def reset(self) -> None:
        self.bytes_sent = 0
        self.calls.clear()

    def merged(self, other: CommStats) -> CommStats:
        calls = dict(self.calls)
        for kind, n in other.calls.items():
            calls[kind] = calls.get(kind, 0) + n
        return CommStats(self.bytes_sent + other.bytes_sent, calls)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class DeviceCommunicatorBase:
    """Tensor collectives over ``device_group`` (falls back to ``cpu_group`` when none is given).

    Every method expects the same shape and dtype on all ranks of the group, like the
    torch.distributed calls underneath.
    """

    def __init__(
        self,
        cpu_group: ProcessGroup,
        device: torch.device | None = None,
        device_group: ProcessGroup | None = None,
        unique_name: str = "",
    ) -> None:
        self.cpu_group = cpu_group
        self.device = device or torch.device("cpu")
        self.device_group = device_group if device_group is not None else cpu_group
        self.unique_name = unique_name
        self.ranks: list[int] = dist.get_process_group_ranks(cpu_group)
        self.rank = dist.get_rank()
        self.rank_in_group = dist.get_rank(cpu_group)
        self.world_size = dist.get_world_size(cpu_group)
        self.stats = CommStats()

    def _group_for(self, tensor: torch.Tensor) -> ProcessGroup:
        # A CPU tensor cannot go through nccl: use the gloo group for it.
        return self.cpu_group if tensor.device.type == "cpu" else self.device_group

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        """Sum over the group, out of place: ``input_`` is left untouched."""
        out = input_.clone(memory_format=torch.contiguous_format)
        self.stats.add("all_reduce", 2 * _nbytes(out) * (self.world_size - 1) // self.world_size)
        dist.all_reduce(out, group=self._group_for(out))
        return out

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``input_`` along ``dim``, in group-rank order."""
        dim = dim % input_.dim() if input_.dim() else 0
        # flat buffers: the backends split the output along dim 0, one equal chunk per rank
        flat = torch.empty(self.world_size * input_.numel(), dtype=input_.dtype, device=input_.device)
        self.stats.add("all_gather", _nbytes(input_) * (self.world_size - 1))
        all_gather_single(flat, input_.contiguous().reshape(-1), group=self._group_for(input_))
        stacked = flat.view(self.world_size, *input_.shape)
        if input_.dim() == 0:
            return stacked
        shape = list(input_.shape)
        shape[dim] *= self.world_size
        return stacked.movedim(0, dim).reshape(shape)

    def reduce_scatter(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Sum over the group, then keep chunk ``rank_in_group`` of ``dim`` (which the group size must divide)."""
        dim = dim % input_.dim()
        if input_.shape[dim] % self.world_size != 0:
            raise ValueError(
                f"reduce_scatter: size {input_.shape[dim]} of dim {dim} is not divisible by group size {self.world_size}"
            )
        moved = input_.movedim(dim, 0).contiguous()
        out = torch.empty(moved.numel() // self.world_size, dtype=input_.dtype, device=input_.device)
        self.stats.add("reduce_scatter", _nbytes(moved) * (self.world_size - 1) // self.world_size)
        reduce_scatter_single(out, moved.reshape(-1), group=self._group_for(input_))
        out = out.view(moved.shape[0] // self.world_size, *moved.shape[1:])
        return out.movedim(0, dim).contiguous()

    def gather(self, input_: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        """Concatenate along ``dim`` on group rank ``dst``; other ranks get ``None``."""
        dim = dim % input_.dim()
        is_dst = self.rank_in_group == dst
        if not is_dst:
            self.stats.add("gather", _nbytes(input_))
        gather_list = [torch.empty_like(input_, memory_format=torch.contiguous_format)
                       for _ in range(self.world_size)] if is_dst else None
        dist.gather(input_.contiguous(), gather_list, dst=self.ranks[dst], group=self._group_for(input_))
        return torch.cat(gather_list, dim=dim) if is_dst else None

    def broadcast(self, input_: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: every rank's ``input_`` becomes group rank ``src``'s; returns it."""
        if self.rank_in_group == src:
            self.stats.add("broadcast", _nbytes(input_) * (self.world_size - 1))
        dist.broadcast(input_, src=self.ranks[src], group=self._group_for(input_))
        return input_

    def all_to_all_single(self, output: torch.Tensor, input_: torch.Tensor) -> torch.Tensor:
        """Chunk ``i`` of ``input_`` (dim 0) goes to group rank ``i``; chunk ``j`` of ``output`` comes from ``j``."""
        self.stats.add("all_to_all", _nbytes(input_) * (self.world_size - 1) // self.world_size)
        dist.all_to_all_single(output, input_, group=self._group_for(input_))
        return output

    def send(self, tensor: torch.Tensor, dst: int | None = None) -> None:
        """Blocking send to group rank ``dst`` (default: the next rank)."""
        if dst is None:
            dst = (self.rank_in_group + 1) % self.world_size
        self.stats.add("send", _nbytes(tensor))
        dist.send(tensor.contiguous(), dst=self.ranks[dst], group=self._group_for(tensor))

    def recv(self, size: torch.Size, dtype: torch.dtype, src: int | None = None) -> torch.Tensor:
        """Blocking receive from group rank ``src`` (default: the previous rank)."""
        return self.recv_into(torch.empty(size, dtype=dtype, device=self.device), src)

    def recv_into(self, tensor: torch.Tensor, src: int | None = None) -> torch.Tensor:
        """Blocking receive into ``tensor`` (contiguous; a cpu tensor travels on the cpu group); returns it."""
        if src is None:
            src = (self.rank_in_group - 1) % self.world_size
        dist.recv(tensor, src=self.ranks[src], group=self._group_for(tensor))
        return tensor

    def batch_send_recv(self, ops: list[tuple[str, torch.Tensor, int]]) -> list[dist.Work]:
        """Launch point-to-point operations together; returns their works (wait on each).

        ``ops``: ``("send", tensor, dst)`` / ``("recv", tensor, src)`` with group ranks. A sent tensor must be
        contiguous and must not change until its work completes; a received one is filled in place.
        """
        p2p = []
        for kind, tensor, peer in ops:
            if kind == "send":
                self.stats.add("p2p_send", _nbytes(tensor))
                p2p.append(dist.P2POp(dist.isend, tensor, self.ranks[peer], group=self._group_for(tensor)))
            elif kind == "recv":
                p2p.append(dist.P2POp(dist.irecv, tensor, self.ranks[peer], group=self._group_for(tensor)))
            else:
                raise ValueError(f"batch_send_recv: op kind {kind!r} is not 'send' or 'recv'")
        return dist.batch_isend_irecv(p2p) if p2p else []

    def destroy(self) -> None:
        """Release communicator resources (the base class holds none beyond the groups)."""
