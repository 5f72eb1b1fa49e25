"""``GroupCoordinator``: one rank group and every way its ranks talk to each other.

Each coordinator owns, for the group this rank belongs to:

* ``cpu_group`` — a gloo group for metadata, objects and barriers;
* ``device_group`` — the group tensors travel on (nccl on CUDA). With the gloo backend (CPU) the
  one gloo group serves as both: a second gloo group would only duplicate sockets;
* a :class:`~parallel.device_communicator.DeviceCommunicatorBase` that runs every exchange: the tensor
  collectives, and the metadata bytes of the object / tensor-dict methods (cpu tensors: over the cpu group).

Which group a tensor travels on follows its device (:meth:`GroupCoordinator.group_for`): a CPU tensor (metadata,
sizes, a CPU activation) over ``cpu_group``, a CUDA tensor over ``device_group``. NCCL refuses CPU tensors, so
nothing may put one on ``device_group`` (tests/test_device_groups.py runs the mesh on a backend that refuses them).

Objects are msgspec-encoded (``comm.serde``), never pickled. All ``src`` / ``dst`` arguments are
ranks in the group (0 .. world_size-1); ``.rank`` and ``.ranks`` are global ranks.

A group of one rank — including the trivial group used when torch.distributed is not initialized
at all — turns every collective into the identity, with no communication.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import msgspec
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from omni_runtime.comm.node import node_id
from omni_runtime.comm.serde import decode_from_bytes as _decode_bytes
from omni_runtime.comm.serde import encode_to_bytes as _encode_bytes
from omni_runtime.comm.tensor_meta import TensorMeta
from omni_runtime.parallel.device_communicator import DeviceCommunicatorBase, all_gather_single

logger = logging.getLogger(__name__)

_name_counter = itertools.count()


class DictEntry(msgspec.Struct, array_like=True):
    """One key of a tensor dict: either a tensor (``tensor`` set) or a plain ``value``."""

    key: Any
    tensor: TensorMeta | None = None
    value: Any = None


def in_the_same_node_as(pg: Any, source_rank: int = 0) -> list[bool]:
    """Collective over ``pg``: for each rank of ``pg``, whether it shares a node with ``source_rank``.

    "Same node" means same hostname, same kernel boot id and the same ``/dev/shm`` mount, i.e. the
    ranks can reach each other's shared memory. ``pg`` is a torch.distributed (gloo) group or a
    :class:`comm.stateless_pg.StatelessProcessGroup`; ``source_rank`` is a rank in ``pg``.
    """
    key = node_id()
    if hasattr(pg, "all_gather_obj"):  # StatelessProcessGroup: objects through its store
        keys = pg.all_gather_obj(key)
        if not 0 <= source_rank < len(keys):
            raise ValueError(f"source_rank={source_rank} is not a rank of the group (size {len(keys)})")
        return [k == keys[source_rank] for k in keys]
    world_size = dist.get_world_size(pg)
    if not 0 <= source_rank < world_size:
        raise ValueError(f"source_rank={source_rank} is not a rank of the group (size {world_size})")
    if world_size == 1:
        return [True]
    raw = key.encode()[:255]
    width = 256
    local = torch.zeros(width, dtype=torch.uint8)
    local[0] = len(raw)
    local[1:1 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    gathered = torch.empty(world_size * width, dtype=torch.uint8)
    all_gather_single(gathered, local, group=pg)
    rows = gathered.view(world_size, width)
    return [bool(torch.equal(rows[i], rows[source_rank])) for i in range(world_size)]


class GroupCoordinator:
    """A torch.distributed group (plus its gloo twin) seen from one rank, with all its collectives.

    Args:
        group_ranks: every group of this kind, as lists of global ranks; every rank of the world
            must construct the coordinator with the same lists (group creation is collective).
        local_rank: this process's device index on its node.
        torch_distributed_backend: "gloo" or "nccl" (or a registered backend), the backend of ``device_group``.
        group_name: a readable name ("sp", "ring", ...); ``unique_name`` adds a counter.
    """

    def __init__(
        self,
        group_ranks: Sequence[Sequence[int]],
        local_rank: int,
        torch_distributed_backend: str | dist.Backend,
        group_name: str | None = None,
    ) -> None:
        self.group_name = group_name or "anonymous"
        self.unique_name = f"{self.group_name}:{next(_name_counter)}"
        self.local_rank = local_rank
        self.backend = str(torch_distributed_backend)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.cpu_group: ProcessGroup | None = None
        self.device_group: ProcessGroup | None = None
        ranks: list[int] | None = None

        if dist.is_initialized():
            for candidate in group_ranks:
                candidate = [int(r) for r in candidate]
                device_group = dist.new_group(candidate, backend=self.backend)
                cpu_group = device_group if self.backend == "gloo" else dist.new_group(candidate, backend="gloo")
                if self.rank in candidate:
                    ranks, self.device_group, self.cpu_group = candidate, device_group, cpu_group
        else:
            for candidate in group_ranks:
                if self.rank in candidate:
                    ranks = [int(r) for r in candidate]
            if ranks is not None and len(ranks) != 1:
                raise RuntimeError(
                    f"group {self.group_name} has ranks {ranks} but torch.distributed is not initialized; "
                    "call init_distributed_environment() first"
                )
        if ranks is None:
            raise ValueError(f"rank {self.rank} is in none of the {self.group_name} groups {list(group_ranks)}")

        self.ranks: list[int] = ranks
        self.world_size = len(ranks)
        self.rank_in_group = ranks.index(self.rank)
        if "nccl" in self.backend and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{local_rank}")
        else:
            self.device = torch.device("cpu")

        self.device_communicator: DeviceCommunicatorBase | None = None
        if self.world_size > 1:
            self.device_communicator = DeviceCommunicatorBase(
                cpu_group=self.cpu_group, device=self.device, device_group=self.device_group,
                unique_name=self.unique_name,
            )
        logger.debug("group %s: ranks %s, this rank %d (in group %d)",
                     self.unique_name, self.ranks, self.rank, self.rank_in_group)

    @classmethod
    def single(cls, rank: int = 0, group_name: str | None = None) -> GroupCoordinator:
        """A group of just this process that needs no torch.distributed (``rank`` is informative)."""
        self = cls.__new__(cls)
        self.group_name = group_name or "single"
        self.unique_name = f"{self.group_name}:{next(_name_counter)}"
        self.local_rank = 0
        self.backend = "gloo"
        self.rank = rank
        self.cpu_group = None
        self.device_group = None
        self.ranks = [rank]
        self.world_size = 1
        self.rank_in_group = 0
        self.device = torch.device("cpu")
        self.device_communicator = None
        return self

    def __repr__(self) -> str:
        return (f"GroupCoordinator({self.unique_name}, ranks={self.ranks}, rank={self.rank}, "
                f"rank_in_group={self.rank_in_group})")

    # ------------------------------------------------------------------ argument checks
    def _check_group_rank(self, name: str, value: int) -> None:
        if not 0 <= value < self.world_size:
            raise ValueError(f"{name}={value} is not a rank of group {self.group_name} (size {self.world_size})")

    def _require_peers(self, op: str) -> None:
        if self.world_size == 1:
            raise ValueError(f"{op}: group {self.group_name} has a single rank, there is no peer to talk to")

    # ------------------------------------------------------------------ tensor collectives
    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        """Sum over the group; out of place (``input_`` is not modified). World 1: returns ``input_``."""
        if self.world_size == 1:
            return input_
        return self.device_communicator.all_reduce(input_)

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's tensor along ``dim`` (any dim, negative allowed), in group-rank order."""
        if not -input_.dim() <= dim < max(input_.dim(), 1):
            raise ValueError(f"all_gather: dim {dim} is out of range for a {input_.dim()}-d tensor")
        if self.world_size == 1:
            return input_
        return self.device_communicator.all_gather(input_, dim)

    def reduce_scatter(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Sum over the group and keep this rank's chunk of ``dim`` (chunk ``rank_in_group``)."""
        if self.world_size == 1:
            return input_
        return self.device_communicator.reduce_scatter(input_, dim)

    def gather(self, input_: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        """Concatenate along ``dim`` on group rank ``dst``; returns ``None`` on the other ranks."""
        self._check_group_rank("dst", dst)
        if self.world_size == 1:
            return input_
        return self.device_communicator.gather(input_, dst, dim)

    def broadcast(self, input_: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: ``input_`` becomes group rank ``src``'s tensor on every rank; returns it."""
        self._check_group_rank("src", src)
        if self.world_size == 1:
            return input_
        return self.device_communicator.broadcast(input_, src)

    def send(self, tensor: torch.Tensor, dst: int | None = None) -> None:
        """Send a tensor to group rank ``dst`` (default: next rank)."""
        self._require_peers("send")
        self.device_communicator.send(tensor, dst)

    def recv(self, size: torch.Size, dtype: torch.dtype, src: int | None = None) -> torch.Tensor:
        """Receive a tensor of known ``size``/``dtype`` from group rank ``src`` (default: previous rank)."""
        self._require_peers("recv")
        return self.device_communicator.recv(size, dtype, src)

    # ------------------------------------------------------------------ bytes and objects (cpu group)
    def _broadcast_bytes(self, payload: bytes | None, src: int) -> memoryview:
        is_src = self.rank_in_group == src
        size = torch.tensor([len(payload) if is_src else 0], dtype=torch.int64)
        self.device_communicator.broadcast(size, src)
        if is_src:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        else:
            buf = torch.empty(int(size.item()), dtype=torch.uint8)
        self.device_communicator.broadcast(buf, src)
        return memoryview(buf.numpy())

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Broadcast a msgspec-encodable object from group rank ``src`` (over the cpu group); returns it on every
        rank. Receivers get the decoded object (tuples come back as lists)."""
        self._check_group_rank("src", src)
        if self.world_size == 1:
            return obj
        is_src = self.rank_in_group == src
        data = self._broadcast_bytes(_encode_bytes(obj) if is_src else None, src)
        return obj if is_src else _decode_bytes(data)

    def broadcast_object_list(self, obj_list: list[Any], src: int = 0) -> list[Any]:
        """Fill ``obj_list`` in place with group rank ``src``'s list (the lengths must match); returns it."""
        self._check_group_rank("src", src)
        if self.world_size == 1:
            return obj_list
        is_src = self.rank_in_group == src
        data = self._broadcast_bytes(_encode_bytes(list(obj_list)) if is_src else None, src)
        if not is_src:
            received = _decode_bytes(data)
            if len(received) != len(obj_list):
                raise ValueError(f"broadcast_object_list: rank {src} sent {len(received)} objects, "
                                 f"this rank's list holds {len(obj_list)}")
            obj_list[:] = received
        return obj_list

    def send_object(self, obj: Any, dst: int) -> None:
        """Send a msgspec-encodable object to group rank ``dst`` over the cpu group."""
        self._require_peers("send_object")
        self._check_group_rank("dst", dst)
        if dst == self.rank_in_group:
            raise ValueError(f"send_object: dst {dst} is this rank")
        payload = _encode_bytes(obj)
        size = torch.tensor([len(payload)], dtype=torch.int64)
        self.device_communicator.send(size, dst)
        self.device_communicator.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), dst)

    def _recv_bytes(self, src: int) -> memoryview:
        """The payload of one :meth:`send_object` from group rank ``src`` (its size first, then the bytes)."""
        self._check_group_rank("src", src)
        if src == self.rank_in_group:
            raise ValueError(f"receive: src {src} is this rank of group {self.group_name}; a rank cannot receive "
                             "from itself")
        size = torch.empty(1, dtype=torch.int64)
        self.device_communicator.recv_into(size, src)
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
        self.device_communicator.recv_into(buf, src)
        return memoryview(buf.numpy())

    def recv_object(self, src: int) -> Any:
        """Receive an object that group rank ``src`` sent with :meth:`send_object`."""
        self._require_peers("recv_object")
        return _decode_bytes(self._recv_bytes(src))

    # ------------------------------------------------------------------ tensor dicts
    @staticmethod
    def _split_tensor_dict(tensor_dict: dict[Any, Any]) -> tuple[list[DictEntry], list[torch.Tensor]]:
        if not isinstance(tensor_dict, dict):
            raise TypeError(f"expected a dict, got {type(tensor_dict).__name__}")
        entries: list[DictEntry] = []
        tensors: list[torch.Tensor] = []
        for key, value in tensor_dict.items():
            if isinstance(value, torch.Tensor):
                meta = TensorMeta.of(value)
                entries.append(DictEntry(key, meta))
                tensors.append(value)
            else:
                entries.append(DictEntry(key, None, value))
        return entries, tensors

    def _alloc(self, meta: TensorMeta) -> torch.Tensor:
        device = torch.device("cpu") if meta.device_type == "cpu" else self.device
        return torch.empty(meta.shape, dtype=meta.torch_dtype(), device=device)

    def broadcast_tensor_dict(self, tensor_dict: dict[Any, Any] | None = None, src: int = 0) -> dict[Any, Any]:
        """Broadcast a dict of tensors and plain values from group rank ``src``.

        The metadata (keys, dtypes, shapes, device types, non-tensor values) goes msgspec-encoded
        over the cpu group; tensors then travel over the device group (cpu tensors over the cpu
        group). Receivers allocate on ``self.device`` (cuda tensors) or cpu. ``src`` gets its own
        dict back.
        """
        self._check_group_rank("src", src)
        if self.world_size == 1:
            return tensor_dict
        is_src = self.rank_in_group == src
        if is_src:
            entries, tensors = self._split_tensor_dict(tensor_dict)
            self._broadcast_bytes(_encode_bytes(entries), src)
        else:
            entries = _decode_bytes(self._broadcast_bytes(None, src), type=list[DictEntry])
            tensors = [self._alloc(e.tensor) for e in entries if e.tensor is not None]
        for i, tensor in enumerate(tensors):
            if tensor.numel() == 0:
                continue
            if is_src:
                tensor = tensor.contiguous()
                tensors[i] = tensor
            self.device_communicator.broadcast(tensor, src)
        if is_src:
            return tensor_dict
        it = iter(tensors)
        return {e.key: (next(it) if e.tensor is not None else e.value) for e in entries}

    @staticmethod
    def _sliced(numel: int, all_gather_group: GroupCoordinator | None) -> bool:
        """Whether a tensor of ``numel`` elements travels as one slice per rank of ``all_gather_group``."""
        return all_gather_group is not None and all_gather_group.world_size > 1 and numel > 0 \
            and numel % all_gather_group.world_size == 0

    def send_tensor_dict(self, tensor_dict: dict[Any, Any], dst: int | None = None,
                         all_gather_group: GroupCoordinator | None = None) -> None:
        """Send a dict of tensors and plain values to group rank ``dst`` (default: next rank).

        ``all_gather_group`` (vLLM's meaning): every rank of that group sends the same dict to its own peer, so each
        sends only its ``1 / size`` slice of every tensor whose element count the size divides, and the receivers
        (who pass their own ``all_gather_group`` of the same size to :meth:`recv_tensor_dict`) all-gather them."""
        if self.world_size == 1:
            return
        if dst is None:
            dst = (self.rank_in_group + 1) % self.world_size
        entries, tensors = self._split_tensor_dict(tensor_dict)
        self.send_object(entries, dst)
        for tensor in tensors:
            if not tensor.numel():
                continue
            if self._sliced(tensor.numel(), all_gather_group):
                n = all_gather_group.world_size
                tensor = tensor.contiguous().reshape(n, -1)[all_gather_group.rank_in_group]
            self.device_communicator.send(tensor.contiguous(), dst)

    def recv_tensor_dict(self, src: int | None = None,
                         all_gather_group: GroupCoordinator | None = None) -> dict[Any, Any] | None:
        """Receive a dict that group rank ``src`` (default: previous rank) sent with ``send_tensor_dict`` (with the
        same ``all_gather_group`` size: sliced tensors are all-gathered over it)."""
        if self.world_size == 1:
            return None
        if src is None:
            src = (self.rank_in_group - 1) % self.world_size
        entries = _decode_bytes(self._recv_bytes(src), type=list[DictEntry])
        out: dict[Any, Any] = {}
        for entry in entries:
            if entry.tensor is None:
                out[entry.key] = entry.value
                continue
            tensor = self._alloc(entry.tensor)
            if self._sliced(tensor.numel(), all_gather_group):
                part = tensor.new_empty(tensor.numel() // all_gather_group.world_size)
                self.device_communicator.recv_into(part, src)
                tensor = all_gather_group.all_gather(part, dim=0).reshape(tensor.shape)
            elif tensor.numel():
                self.device_communicator.recv_into(tensor, src)
            out[entry.key] = tensor
        return out

    def group_for(self, device: torch.device | str) -> ProcessGroup | None:
        """The process group whose backend takes tensors on ``device``: ``cpu_group`` (gloo) for a CPU device,
        ``device_group`` otherwise (None for a group of one rank). What FSDP2 and the all2all kernels get."""
        return self.cpu_group if torch.device(device).type == "cpu" else self.device_group

    def barrier(self) -> None:
        """Block until every rank of the group reaches it (on the cpu group, never nccl)."""
        if self.world_size == 1:
            return
        dist.barrier(group=self.cpu_group)

    # ------------------------------------------------------------------ teardown
    def destroy(self) -> None:
        """Destroy this rank's communicator and process groups (idempotent)."""
        if self.device_communicator is not None:
            self.device_communicator.destroy()
            self.device_communicator = None
        if dist.is_initialized():
            for group in {id(g): g for g in (self.device_group, self.cpu_group) if g is not None}.values():
                try:
                    dist.destroy_process_group(group)
                except (ValueError, RuntimeError):
                    pass  # already gone with the default group
        self.device_group = None
        self.cpu_group = None
