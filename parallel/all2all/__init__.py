"""MoE token exchange for expert parallelism: the all2all managers and how a group gets one.

``all2all_backend`` names (the ``[stages.denoiser.parallel]`` config key) map to managers in
:data:`ALL2ALL_BACKENDS`. The CPU-capable ones (``naive``, ``agrs``, ``alltoallv``) run on gloo and nccl; the
two others (``deepep_high_throughput``, ``deepep_low_latency``) wrap DeepEP's GPU kernels and have never run on this
project's machines (see ``gpu_managers``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from omni_runtime.parallel.all2all.base import All2AllError, All2AllManagerBase, local_expert_range
from omni_runtime.parallel.all2all.cpu_managers import (
    AgRsAll2AllManager,
    AllToAllVManager,
    NaiveAll2AllManager,
)
from omni_runtime.parallel.all2all.gpu_managers import (
    All2AllBackendUnavailable,
    DeepEPHTAll2AllManager,
    DeepEPLLAll2AllManager,
)
from omni_runtime.parallel.parallel_spec import ALL2ALL_BACKEND_NAMES, CPU_ALL2ALL_BACKEND_NAMES

if TYPE_CHECKING:
    from omni_runtime.parallel.group_coordinator import GroupCoordinator
    from omni_runtime.parallel.mesh import Mesh

logger = logging.getLogger(__name__)

ALL2ALL_BACKENDS: dict[str, type[All2AllManagerBase]] = {
    "naive": NaiveAll2AllManager,
    "agrs": AgRsAll2AllManager,
    "alltoallv": AllToAllVManager,
    "deepep_high_throughput": DeepEPHTAll2AllManager,
    "deepep_low_latency": DeepEPLLAll2AllManager,
}
CPU_CAPABLE_BACKENDS: tuple[str, ...] = CPU_ALL2ALL_BACKEND_NAMES
if tuple(ALL2ALL_BACKENDS) != ALL2ALL_BACKEND_NAMES:  # pragma: no cover - a programming error, caught at import
    raise ImportError(f"parallel.all2all.ALL2ALL_BACKENDS {tuple(ALL2ALL_BACKENDS)} and "
                      f"parallel_spec.ALL2ALL_BACKEND_NAMES {ALL2ALL_BACKEND_NAMES} disagree")


def attach_all2all_manager(group: Any, backend: str, replica_groups: Sequence[Sequence[int]] | None = None,
                           num_experts: int | None = None, **kwargs: Any) -> All2AllManagerBase | None:
    """Build the ``backend`` manager on ``group``'s communicator (a ``GroupCoordinator``) and plug it in.

    Collective-free. A group of one rank needs no exchange: returns ``None`` and attaches nothing.
    """
    if backend not in ALL2ALL_BACKENDS:
        raise All2AllError(f"all2all_backend = {backend!r}: allowed values are {', '.join(ALL2ALL_BACKENDS)}")
    comm = getattr(group, "device_communicator", None)
    if comm is None:
        return None
    manager = ALL2ALL_BACKENDS[backend](comm, replica_groups, num_experts, **kwargs)
    comm.all2all_manager = manager
    logger.info("EP group %s: all2all backend %s over ranks %s", comm.unique_name, backend, comm.ranks)
    return manager


def init_expert_parallel(mesh: Mesh | None) -> GroupCoordinator | None:
    """The EP group of ``mesh`` with the all2all manager of ``mesh.spec.all2all_backend`` attached, or ``None``
    without expert parallelism (``ep == 1`` or no mesh). Collective-free; call it once per rank after
    ``Mesh.build`` and pass the result as ``ep_group=`` to the denoiser loader. The manager's replica groups are
    :meth:`ParallelSpec.ep_replica_groups` (the data-parallel ranks run the same batch: they split its tokens).
    ``mesh.destroy()`` destroys the manager with the group's communicator."""
    if mesh is None or mesh.spec.ep == 1:
        return None
    group = mesh.group("ep")
    attach_all2all_manager(group, mesh.spec.all2all_backend, mesh.spec.ep_replica_groups())
    return group


__all__ = [
    "ALL2ALL_BACKENDS", "CPU_CAPABLE_BACKENDS", "AgRsAll2AllManager", "All2AllBackendUnavailable", "All2AllError",
    "All2AllManagerBase", "AllToAllVManager", "DeepEPHTAll2AllManager", "DeepEPLLAll2AllManager",
    "NaiveAll2AllManager", "attach_all2all_manager", "init_expert_parallel", "local_expert_range",
]
