"""``Mesh``: the process groups of one stage rank, built from a :class:`ParallelSpec`, passed to what needs them.

::

    mesh = Mesh.build(spec, rank, "tcp://127.0.0.1:29500", torch.device("cpu"))   # or "file:///path/store"
    mesh.group("ulysses").all_gather(x, dim=1)
    mesh.size("sp"), mesh.rank("ring"), mesh.groups_report()
    mesh.destroy()

Every group is a :class:`GroupCoordinator`: a gloo ``cpu_group`` for metadata and a ``device_group`` whose
backend follows the device (nccl for CUDA, gloo for CPU; ``device_backend=`` names another, e.g. a test's).
The default (world) group that ``Mesh.build`` initializes takes both: ``"cpu:gloo,cuda:nccl"`` on CUDA, so a CPU
tensor on it (metadata, a barrier) goes over gloo and never reaches NCCL, which refuses CPU tensors. Kinds whose
groups are all of one rank need no process group at all, and kinds with the same partition of the ranks (``sp``
and ``ulysses`` when ``ring`` is 1) share one coordinator. ``Mesh.single()`` is the mesh of one process without
torch.distributed.

The last mesh built (or the one given to :func:`set_current_mesh`) is the *current* mesh, which the seed-compatible
getters of :mod:`parallel.state` answer from; model code receives its mesh explicitly instead.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from omni_runtime.parallel.device_communicator import CommStats
from omni_runtime.parallel.group_coordinator import GroupCoordinator
from omni_runtime.parallel.parallel_spec import GROUP_NAMES, ParallelSpec, ParallelSpecError

logger = logging.getLogger(__name__)

#: ``mesh.group`` names: the spec's groups plus ``sp`` spelled out (``ulysses × ring``).
MESH_GROUPS: tuple[str, ...] = GROUP_NAMES


class MeshError(ValueError):
    """A mesh cannot be built or asked as requested (names the argument, the value and what is allowed)."""


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend for tensors on ``device``: nccl for CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def world_backend(device_backend: str) -> str:
    """The default group's backend for a mesh whose device groups use ``device_backend``: gloo alone on CPU, else
    one backend per device type, ``"cpu:gloo,cuda:<device_backend>"``, so CPU tensors on the default group (the
    rank fan-out's handle, barriers, metadata) go over gloo and CUDA tensors over the device backend."""
    return "gloo" if device_backend == "gloo" else f"cpu:gloo,cuda:{device_backend}"


def _init_torch_distributed(world_size: int, rank: int, init_method: str | None, backend: str,
                            timeout_s: float) -> None:
    if init_method is None:
        if world_size != 1:
            raise MeshError(f"init_method=None with world size {world_size}: a tcp://host:port or file://path "
                            "rendezvous is needed for more than one rank")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s))
        return
    if not init_method.startswith(("tcp://", "file://", "env://")):
        raise MeshError(f"init_method={init_method!r}: allowed are 'tcp://host:port', 'file:///path' or 'env://'")
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank,
                            timeout=timedelta(seconds=timeout_s))


class Mesh:
    """The groups of one rank. Build it with :meth:`build` (collective) or :meth:`single`."""

    def __init__(self, spec: ParallelSpec, global_rank: int, device: torch.device,
                 groups: dict[str, GroupCoordinator], owns_process_group: bool = False) -> None:
        self.spec = spec
        self.global_rank = global_rank
        self.device = torch.device(device)
        self._groups = groups
        self._owns_process_group = owns_process_group
        self._destroyed = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, spec: ParallelSpec, rank: int, init_method: str | None, device: torch.device | str,
              *, timeout_s: float = 600.0, device_backend: str | None = None) -> Mesh:
        """Create every group of ``spec`` for global ``rank``; collective over all ``spec.world_size`` ranks.

        Initializes torch.distributed first when it is not (``init_method``: ``tcp://host:port`` or
        ``file:///path``; the caller chooses it and so where a store listens), with :func:`world_backend`.
        ``device_backend``: the backend of the device groups, by default :func:`backend_for` ``(device)``
        (tests/test_device_groups.py passes a registered backend that refuses CPU tensors as NCCL does).
        The new mesh becomes the current mesh.
        """
        if not isinstance(spec, ParallelSpec):
            raise MeshError(f"spec must be a ParallelSpec, got {type(spec).__name__}")
        world = spec.world_size
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise MeshError(f"rank={rank!r}: must be an integer from 0 to {world - 1} (world size {world}: "
                            f"{spec.describe()})")
        device = torch.device(device)
        backend = device_backend or backend_for(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        owns = False
        if not dist.is_initialized():
            _init_torch_distributed(world, rank, init_method, world_backend(backend), timeout_s)
            owns = True
        elif dist.get_world_size() != world or dist.get_rank() != rank:
            raise ParallelSpecError(f"torch.distributed is initialized with world size {dist.get_world_size()} "
                                    f"(rank {dist.get_rank()}), but {spec.describe()} needs world size {world} "
                                    f"(rank {rank})")
        local_rank = device.index if device.index is not None else 0
        all_groups = spec.group_ranks()
        by_partition: dict[tuple, GroupCoordinator] = {}
        groups: dict[str, GroupCoordinator] = {}
        try:
            for name in MESH_GROUPS:
                partition = tuple(tuple(g) for g in all_groups[name])
                if all(len(g) == 1 for g in partition):
                    groups[name] = GroupCoordinator.single(rank, group_name=name)
                    continue
                if partition not in by_partition:  # same ranks, same groups: one coordinator (fewer sockets)
                    by_partition[partition] = GroupCoordinator(all_groups[name], local_rank, backend,
                                                               group_name=name)
                groups[name] = by_partition[partition]
        except BaseException:
            for coord in by_partition.values():
                coord.destroy()
            if owns:
                dist.destroy_process_group()
            raise
        mesh = cls(spec, rank, device, groups, owns_process_group=owns)
        set_current_mesh(mesh)
        logger.info("rank %d: mesh %s on %s (%s) -> %s", rank, spec.describe(), device, backend,
                    {n: g for n, g in mesh.groups_report().items() if len(g) > 1})
        return mesh

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> Mesh:
        """The mesh of one process: every group is {this process}; no torch.distributed needed."""
        groups = {name: GroupCoordinator.single(0, group_name=name) for name in MESH_GROUPS}
        return cls(ParallelSpec(), 0, torch.device(device), groups)

    # ------------------------------------------------------------------ queries
    def _check(self, name: str) -> GroupCoordinator:
        if self._destroyed:
            raise MeshError(f"mesh group {name!r}: the mesh was destroyed")
        group = self._groups.get(name)
        if group is None:
            raise MeshError(f"unknown mesh group {name!r}; allowed: {', '.join(MESH_GROUPS)}")
        return group

    def group(self, name: str) -> GroupCoordinator:
        """The :class:`GroupCoordinator` of kind ``name`` this rank belongs to."""
        return self._check(name)

    def size(self, name: str) -> int:
        """Number of ranks in this rank's group ``name``."""
        return self._check(name).world_size

    def rank(self, name: str) -> int:
        """This rank's index in its group ``name``."""
        return self._check(name).rank_in_group

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    def groups_report(self) -> dict[str, list[int]]:
        """This rank's groups as global ranks, ``{name: ranks}`` for every name (tests, the Ready handshake)."""
        return {name: list(self._check(name).ranks) for name in MESH_GROUPS}

    def _coordinators(self) -> list[GroupCoordinator]:
        return list({id(g): g for g in self._groups.values()}.values())

    def comm_stats(self) -> CommStats:
        """Bytes this rank sent through all of its groups' communicators (each shared coordinator once)."""
        total = CommStats()
        for coord in self._coordinators():
            if coord.device_communicator is not None:
                total = total.merged(coord.device_communicator.stats)
        return total

    def reset_comm_stats(self) -> None:
        for coord in self._coordinators():
            if coord.device_communicator is not None:
                coord.device_communicator.stats.reset()

    def __repr__(self) -> str:
        return f"Mesh({self.spec.describe()}, rank={self.global_rank}, device={self.device})"

    # ------------------------------------------------------------------ teardown
    def destroy(self) -> None:
        """Destroy every group (and torch.distributed if this mesh initialized it). Idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        for coord in self._coordinators():
            coord.destroy()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        if current_mesh() is self:
            set_current_mesh(None)


_CURRENT: list[Mesh] = []  # at most one: the mesh the seed-compatible getters of parallel.state answer from


def set_current_mesh(mesh: Mesh | None) -> None:
    """Make ``mesh`` the current mesh (None: none; the getters then answer as for one process)."""
    _CURRENT[:] = [] if mesh is None else [mesh]


def current_mesh() -> Mesh | None:
    """The current mesh, or None."""
    return _CURRENT[0] if _CURRENT else None
