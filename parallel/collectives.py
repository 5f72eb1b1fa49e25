"""Sequence-parallel communication primitives: Ulysses all-to-all and the Ring P2P exchange.

* ``all_to_all_4D`` re-shards q/k/v between "split by sequence" and "split by heads":
  ``(bs, seq/P, hc, hd) -> (bs, seq, hc/P, hd)`` (``scatter_idx=2, gather_idx=1``) and back
  (``scatter_idx=1, gather_idx=2``). ``all_to_all_5D`` does the same for packed qkv
  ``(bs, seq/P, 3, hc, hd) <-> (bs, seq, 3, hc/P, hd)``.
* ``SeqAllToAll4D`` / ``SeqAllToAll5D`` are their autograd Functions: the backward of an
  all-to-all is the reverse all-to-all.
* ``RingComm`` queues a send to the next rank and a receive from the previous one, launches them
  together (``commit``) and waits (``wait``): the inner loop of ring attention.

Sequence chunks are ordered by rank in the group: rank ``i`` holds sequence rows
``[i*seq/P, (i+1)*seq/P)`` and, after the forward all-to-all, heads ``[i*hc/P, (i+1)*hc/P)``.
Every exchange goes through the group's :class:`~parallel.device_communicator.DeviceCommunicatorBase` (the one
communication seam, which also counts the bytes). ``group`` is a ``GroupCoordinator`` (its communicator is used),
a ProcessGroup or ``None`` (the default world group; a communicator is made for the call). A group of one rank (or
no torch.distributed at all) makes every function the identity. Prefer passing the coordinator: the one-rank
groups of a ``Mesh`` have no process group, and ``coordinator.device_group`` (None) would mean "the world".
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from omni_runtime.parallel.device_communicator import DeviceCommunicatorBase

if TYPE_CHECKING:
    from omni_runtime.parallel.group_coordinator import GroupCoordinator

logger = logging.getLogger(__name__)


def communicator_of(group: Any) -> DeviceCommunicatorBase | None:
    """The communicator of a GroupCoordinator, ProcessGroup or None (the world); None for a group of one rank.

    A GroupCoordinator is read through its ``world_size`` first: a one-rank coordinator has no process group
    and must not fall back to the world.
    """
    if hasattr(group, "device_communicator") and hasattr(group, "world_size"):
        return group.device_communicator if group.world_size > 1 else None
    if not dist.is_initialized():
        return None
    pg = group if group is not None else dist.group.WORLD
    if dist.get_world_size(pg) == 1:
        return None
    return DeviceCommunicatorBase(cpu_group=pg, device_group=pg)


def _sync(tensor: torch.Tensor, use_sync: bool) -> None:
    if use_sync and tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def _check_divisible(what: str, size: int, world: int) -> None:
    if size % world != 0:
        raise ValueError(f"all-to-all: {what} {size} is not divisible by the group size {world}")


def _all_to_all_dim0(x: torch.Tensor, comm: DeviceCommunicatorBase, use_sync: bool) -> torch.Tensor:
    """Chunk ``i`` of ``x`` along dim 0 goes to rank ``i``; chunk ``j`` of the result came from rank ``j``
    (``use_sync``: a CUDA result is synchronized before it is returned)."""
    x = x.contiguous()
    out = comm.all_to_all_single(torch.empty_like(x), x)
    _sync(out, use_sync)
    return out


def _checked_communicator(fn: str, x: torch.Tensor, layout: str, idx: tuple[int, int],
                          allowed: tuple[tuple[int, int], tuple[int, int]],
                          group: Any) -> tuple[DeviceCommunicatorBase | None, int]:
    """The checks every all-to-all of ``fn`` makes (``x`` has the dims of ``layout``, ``idx`` = (scatter_idx,
    gather_idx) is one of ``allowed``), then its communicator (None for one rank) and the group size."""
    dims = layout.count(",") + 1
    if x.dim() != dims:
        raise ValueError(f"{fn} expects a {dims}-d tensor ({layout}), got shape {tuple(x.shape)}")
    comm = communicator_of(group)
    world = 1 if comm is None else comm.world_size
    if idx not in allowed:
        raise ValueError(f"{fn} supports (scatter_idx, gather_idx) = {allowed[0]} or {allowed[1]}, "
                         f"got ({idx[0]}, {idx[1]})")
    return comm, world


def all_to_all_4D(
    input: torch.Tensor,  # noqa: A002 - the documented parameter name
    scatter_idx: int = 2,
    gather_idx: int = 1,
    group: ProcessGroup | GroupCoordinator | None = None,
    use_sync: bool = False,
) -> torch.Tensor:
    """All-to-all for q/k/v in ``(batch, seq, heads, head_dim)`` layout.

    ``scatter_idx=2, gather_idx=1``: ``(bs, seq/P, hc, hd) -> (bs, seq, hc/P, hd)`` (scatter heads,
    gather sequence). ``scatter_idx=1, gather_idx=2``: ``(bs, seq, hc/P, hd) -> (bs, seq/P, hc, hd)``.
    The head count (resp. sequence length) must be divisible by the group size.
    """
    comm, world = _checked_communicator("all_to_all_4D", input, "bs, seq, heads, head_dim",
                                        (scatter_idx, gather_idx), ((2, 1), (1, 2)), group)
    if world == 1:
        return input
    if scatter_idx == 2:
        bs, shard_seq, hc, hd = input.shape
        _check_divisible("head count", hc, world)
        # (bs, s/P, P, hc/P, hd) -> (P, s/P, bs, hc/P, hd): chunk p = heads for rank p
        x = input.reshape(bs, shard_seq, world, hc // world, hd).permute(2, 1, 0, 3, 4)
        out = _all_to_all_dim0(x, comm, use_sync)
        # dim 0 is now the source rank = the sequence chunk index
        return out.reshape(world * shard_seq, bs, hc // world, hd).transpose(0, 1).contiguous()
    bs, seq, shard_hc, hd = input.shape
    _check_divisible("sequence length", seq, world)
    # (bs, P, s/P, hc/P, hd) -> (P, hc/P, s/P, bs, hd): chunk p = sequence rows for rank p
    x = input.reshape(bs, world, seq // world, shard_hc, hd).permute(1, 3, 2, 0, 4)
    out = _all_to_all_dim0(x, comm, use_sync)
    # dim 0 is now the source rank = the head chunk index
    return out.reshape(world * shard_hc, seq // world, bs, hd).permute(2, 1, 0, 3).contiguous()


def all_to_all_5D(
    input: torch.Tensor,  # noqa: A002 - the documented parameter name
    scatter_idx: int = 3,
    gather_idx: int = 1,
    group: ProcessGroup | GroupCoordinator | None = None,
    use_sync: bool = False,
) -> torch.Tensor:
    """All-to-all for packed qkv ``(bs, seq, 3, heads, head_dim)``.

    ``scatter_idx=3, gather_idx=1``: ``(bs, seq/P, 3, hc, hd) -> (bs, seq, 3, hc/P, hd)``;
    ``scatter_idx=1, gather_idx=3``: the reverse.
    """
    comm, world = _checked_communicator("all_to_all_5D", input, "bs, seq, 3, heads, head_dim",
                                        (scatter_idx, gather_idx), ((3, 1), (1, 3)), group)
    if world == 1:
        return input
    if scatter_idx == 3:
        bs, shard_seq, three, hc, hd = input.shape
        _check_divisible("head count", hc, world)
        # (bs, s/P, 3, P, hc/P, hd) -> (P, s/P, bs, 3, hc/P, hd)
        x = input.reshape(bs, shard_seq, three, world, hc // world, hd).permute(3, 1, 0, 2, 4, 5)
        out = _all_to_all_dim0(x, comm, use_sync)
        return out.reshape(world * shard_seq, bs, three, hc // world, hd).transpose(0, 1).contiguous()
    bs, seq, three, shard_hc, hd = input.shape
    _check_divisible("sequence length", seq, world)
    # (bs, P, s/P, 3, hc/P, hd) -> (P, hc/P, s/P, bs, 3, hd)
    x = input.reshape(bs, world, seq // world, three, shard_hc, hd).permute(1, 4, 2, 0, 3, 5)
    out = _all_to_all_dim0(x, comm, use_sync)
    # (P*hc/P, s/P, bs, 3, hd) -> (bs, s/P, 3, hc, hd)
    return out.reshape(world * shard_hc, seq // world, bs, three, hd).permute(2, 1, 3, 0, 4).contiguous()


def _reverse_all_to_all(ctx: Any, grad_output: torch.Tensor) -> tuple[None, torch.Tensor, None, None, None]:
    """Backward of both SeqAllToAll Functions: the same all-to-all with scatter and gather swapped."""
    grad = ctx.function.apply(ctx.group, grad_output, ctx.gather_idx, ctx.scatter_idx, ctx.use_sync)
    return None, grad, None, None, None


class SeqAllToAll4D(torch.autograd.Function):
    """Differentiable :func:`all_to_all_4D`; the gradient goes back through the reverse all-to-all."""

    @staticmethod
    def forward(
        ctx: Any,
        group: ProcessGroup | GroupCoordinator | None,
        input: torch.Tensor,  # noqa: A002
        scatter_idx: int,
        gather_idx: int,
        use_sync: bool = False,
    ) -> torch.Tensor:
        ctx.function, ctx.group, ctx.scatter_idx, ctx.gather_idx, ctx.use_sync = (
            SeqAllToAll4D, group, scatter_idx, gather_idx, use_sync)
        return all_to_all_4D(input, scatter_idx, gather_idx, group=group, use_sync=use_sync)

    backward = staticmethod(_reverse_all_to_all)


class SeqAllToAll5D(torch.autograd.Function):
    """Differentiable :func:`all_to_all_5D`; the gradient goes back through the reverse all-to-all."""

    @staticmethod
    def forward(
        ctx: Any,
        group: ProcessGroup | GroupCoordinator | None,
        input: torch.Tensor,  # noqa: A002
        scatter_idx: int = 3,
        gather_idx: int = 1,
        use_sync: bool = False,
    ) -> torch.Tensor:
        ctx.function, ctx.group, ctx.scatter_idx, ctx.gather_idx, ctx.use_sync = (
            SeqAllToAll5D, group, scatter_idx, gather_idx, use_sync)
        return all_to_all_5D(input, scatter_idx, gather_idx, group=group, use_sync=use_sync)

    backward = staticmethod(_reverse_all_to_all)


class RingComm:
    """Point-to-point ring over ``process_group``: send to rank+1, receive from rank-1 (in the group).

    Usage, once per ring step::

        comm = RingComm(group)
        next_k = comm.send_recv(k)      # queue: send k, receive into a new tensor
        comm.commit()                   # launch all queued ops together (the communicator's batched p2p)
        ...compute with k...
        comm.wait()                     # next_k is now filled

    ``process_group`` is a GroupCoordinator (preferred), a ProcessGroup or None (the world). ``rank`` and
    ``world_size`` are in the group; ``send_rank`` / ``recv_rank`` are the peers' *global* ranks.
    """

    def __init__(self, process_group: ProcessGroup | GroupCoordinator | None) -> None:
        comm = communicator_of(process_group)
        if comm is None:
            raise ValueError(f"RingComm needs a group of at least 2 ranks, got {process_group!r}")
        self._comm = comm
        self._ops: list[tuple[str, torch.Tensor, int]] = []
        self._reqs: list[Any] | None = None
        self.rank = comm.rank_in_group
        self.world_size = comm.world_size
        self._next = (self.rank + 1) % self.world_size
        self._prev = (self.rank - 1) % self.world_size
        self.send_rank = comm.ranks[self._next]
        self.recv_rank = comm.ranks[self._prev]

    def send_recv(self, to_send: torch.Tensor, recv_tensor: torch.Tensor | None = None) -> torch.Tensor:
        """Queue sending ``to_send`` to the next rank and receiving the previous rank's tensor.

        Returns the tensor that will hold the received data after :meth:`wait` (``recv_tensor`` if
        given, else a new tensor shaped like ``to_send``). ``to_send`` must not change until then.
        """
        if recv_tensor is None:
            recv_tensor = torch.empty_like(to_send, memory_format=torch.contiguous_format)
        elif recv_tensor.shape != to_send.shape or recv_tensor.dtype != to_send.dtype:
            raise ValueError(f"recv_tensor {tuple(recv_tensor.shape)} {recv_tensor.dtype} does not match "
                             f"to_send {tuple(to_send.shape)} {to_send.dtype}")
        self._ops.append(("send", to_send.contiguous(), self._next))
        self._ops.append(("recv", recv_tensor, self._prev))
        return recv_tensor

    def commit(self) -> None:
        """Launch every queued send/receive."""
        if self._reqs is not None:
            raise RuntimeError("RingComm.commit() called twice without wait()")
        self._reqs = self._comm.batch_send_recv(self._ops)

    def wait(self) -> None:
        """Wait for the launched operations; afterwards the tensors from :meth:`send_recv` are filled."""
        if self._reqs is None:
            raise RuntimeError("RingComm.wait() called before commit()")
        for req in self._reqs:
            req.wait()
        self._reqs = None
        self._ops = []
