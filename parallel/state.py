"""The seed-compatible facade over the current :class:`~parallel.mesh.Mesh`: the getters the reference API names.

New code receives its ``Mesh`` explicitly (``Mesh.build``, strategies bind it into models at load). Code written
against the reference API asks this module instead; every getter answers from the one current mesh
(:func:`parallel.mesh.current_mesh`, set by ``Mesh.build`` / ``set_current_mesh``). This module holds no copy of any
group or degree. Without a current mesh every group is {this process}: sizes 1, ranks 0, and single-process model
code runs unchanged, without torch.distributed.

Reference lifecycle (each call builds or destroys a Mesh)::

    init_distributed_environment()                 # torch.distributed + a mesh with only the world group
    initialize_model_parallel(ulysses_degree=2)    # the mesh of these degrees (dp inferred), now current
    get_sp_group().all_gather(x, dim=1)
    destroy_model_parallel(); destroy_distributed_environment()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from omni_runtime.parallel.group_coordinator import GroupCoordinator, in_the_same_node_as
from omni_runtime.parallel.mesh import Mesh, current_mesh, set_current_mesh
from omni_runtime.parallel.parallel_spec import ParallelSpec, ParallelSpecError
from omni_runtime.parallel.utils import (
    divide,
    ensure_divisibility,
    get_pp_indices,
    split_tensor_along_last_dim,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GroupCoordinator", "Mesh", "ParallelSpec", "ParallelSpecError", "current_mesh", "set_current_mesh",
    "divide", "ensure_divisibility", "get_pp_indices", "split_tensor_along_last_dim", "in_the_same_node_as",
    "init_distributed_environment", "initialize_model_parallel", "ensure_model_parallel_initialized",
    "model_parallel_is_initialized", "destroy_model_parallel", "destroy_distributed_environment",
    "get_parallel_spec", "get_world_group", "get_tp_group", "get_sp_group", "get_ulysses_group", "get_ring_group",
    "get_pp_group", "get_pipeline_model_parallel_group", "get_cfg_group", "get_dp_group", "get_ep_group",
    "get_hsdp_shard_group", "get_hsdp_replicate_group",
]

# The world-only mesh of init_distributed_environment, which destroy_model_parallel makes current again.
_BASE: list[Mesh] = []


def _base() -> Mesh | None:
    return _BASE[0] if _BASE else None


# ---------------------------------------------------------------------- initialization
def init_distributed_environment(
    world_size: int = -1,
    rank: int = -1,
    distributed_init_method: str = "env://",
    local_rank: int = -1,
    backend: str | None = None,
) -> None:
    """Initialize torch.distributed (unless already done) and make a mesh of just the world group current.

    ``world_size`` / ``rank`` / ``local_rank`` default to the ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``
    environment variables. The backend defaults to nccl when CUDA is available, gloo otherwise. A world of one with
    ``env://`` and no ``MASTER_ADDR`` uses an in-process store, so a single process needs no rendezvous port.
    """
    if dist.is_initialized():
        if world_size not in (-1, dist.get_world_size()):
            raise ValueError(f"world_size={world_size} but torch.distributed is already initialized "
                             f"with world size {dist.get_world_size()}")
        world_size, rank = dist.get_world_size(), dist.get_rank()
        backend = backend or str(dist.get_backend())
    else:
        if world_size == -1:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if rank == -1:
            rank = int(os.environ.get("RANK", "0"))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if local_rank == -1:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(f"cuda:{local_rank}") if "nccl" in backend else torch.device("cpu")
    method: str | None = distributed_init_method
    if world_size == 1 and method == "env://" and "MASTER_ADDR" not in os.environ:
        method = None  # in-process store
    base = _base()
    if base is not None:
        if base.world_size != world_size:
            raise RuntimeError(f"the world group has size {base.world_size}, torch.distributed has {world_size}")
        return
    mesh = Mesh.build(ParallelSpec(dp=world_size), rank, method, device)
    _BASE[:] = [mesh]


def initialize_model_parallel(
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    cfg_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    hsdp_shard_size: int = 1,
    hsdp_replicate_size: int = 1,
    backend: str | None = None,
    tensor_parallel_size: int = 1,
) -> None:
    """Build the mesh of these degrees (the data-parallel degree is what the world size leaves) and make it current.

    Collective: every rank calls it with the same degrees. Errors (:class:`ParallelSpecError`) show the arithmetic.
    """
    if tensor_parallel_size != 1:
        ParallelSpec(tp=tensor_parallel_size)  # raises the reserved-tp error
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call init_distributed_environment() first")
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel groups are already initialized: call destroy_model_parallel() first, "
                           "or ensure_model_parallel_initialized() to accept the existing mesh")
    if _base() is None:
        init_distributed_environment(backend=backend)
    spec = _spec_for(dist.get_world_size(), ulysses_degree, ring_degree, cfg_parallel_size, pipeline_parallel_size,
                     hsdp_shard_size, hsdp_replicate_size)
    Mesh.build(spec, dist.get_rank(), None, _base().device)


def _spec_for(world_size: int, ulysses: int, ring: int, cfg: int, pp: int, hsdp_shard: int,
              hsdp_replicate: int) -> ParallelSpec:
    """The spec of these degrees with dp = world / (ulysses × ring × cfg × pp)."""
    model = ParallelSpec(ulysses=ulysses, ring=ring, cfg=cfg, pp=pp)  # checks each degree
    if world_size % model.world_size:
        raise ParallelSpecError(f"ulysses {ulysses} × ring {ring} × cfg {cfg} × pp {pp} = {model.world_size} "
                                f"does not divide world size {world_size}")
    return ParallelSpec(ulysses=ulysses, ring=ring, cfg=cfg, pp=pp, dp=world_size // model.world_size,
                        hsdp_shard=hsdp_shard, hsdp_replicate=hsdp_replicate)


def ensure_model_parallel_initialized(
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    cfg_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    hsdp_shard_size: int = 1,
    hsdp_replicate_size: int = 1,
    backend: str | None = None,
) -> None:
    """Initialize the mesh if needed; if one is current, check it has exactly these degrees."""
    if not model_parallel_is_initialized():
        initialize_model_parallel(ulysses_degree, ring_degree, cfg_parallel_size, pipeline_parallel_size,
                                  hsdp_shard_size, hsdp_replicate_size, backend)
        return
    wanted = _spec_for(dist.get_world_size(), ulysses_degree, ring_degree, cfg_parallel_size,
                       pipeline_parallel_size, hsdp_shard_size, hsdp_replicate_size)
    if wanted != get_parallel_spec():
        raise ParallelSpecError(f"model parallel is already initialized as {get_parallel_spec()}, "
                                f"which differs from the requested {wanted}")


def model_parallel_is_initialized() -> bool:
    """Whether a model mesh (not just the world mesh of ``init_distributed_environment``) is current."""
    mesh = current_mesh()
    return mesh is not None and mesh is not _base()


def get_parallel_spec() -> ParallelSpec:
    """The degrees of the current mesh (all 1 without one)."""
    mesh = current_mesh()
    return mesh.spec if mesh is not None else ParallelSpec()


# ---------------------------------------------------------------------- teardown
def destroy_model_parallel() -> None:
    """Destroy the current model mesh; the world mesh (if any) is current again."""
    mesh = current_mesh()
    if mesh is not None and mesh is not _base():
        mesh.destroy()
    set_current_mesh(_base())


def destroy_distributed_environment() -> None:
    """Destroy the current mesh, the world mesh and torch.distributed's default group."""
    destroy_model_parallel()
    base = _base()
    _BASE.clear()
    if base is not None:
        base.destroy()
    set_current_mesh(None)
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------- getters
def _group(name: str) -> GroupCoordinator:
    mesh = current_mesh()
    if mesh is not None:
        return mesh.group(name)
    return GroupCoordinator.single(dist.get_rank() if dist.is_initialized() else 0, group_name=name)


def _getter(name: str) -> Callable[[], GroupCoordinator]:
    """The reference API's ``get_<name>_group``: the current mesh's ``name`` group ({this process} without one)."""

    def get() -> GroupCoordinator:
        return _group(name)

    get.__name__ = get.__qualname__ = f"get_{name}_group"
    get.__doc__ = f"The current mesh's ``{name}`` group ({{this process}} without a mesh)."
    return get


get_world_group = _getter("world")
get_tp_group = _getter("tp")
get_sp_group = _getter("sp")
get_ulysses_group = _getter("ulysses")
get_ring_group = _getter("ring")
get_pp_group = _getter("pp")
get_pipeline_model_parallel_group = get_pp_group
get_cfg_group = _getter("cfg")
get_dp_group = _getter("dp")
get_ep_group = _getter("ep")
get_hsdp_shard_group = _getter("hsdp_shard")
get_hsdp_replicate_group = _getter("hsdp_replicate")


def get_tensor_model_parallel_world_size() -> int:
    return get_tp_group().world_size


def get_tensor_model_parallel_rank() -> int:
    return get_tp_group().rank_in_group


def get_fully_shard_world_size() -> int:
    return get_hsdp_shard_group().world_size


__all__ += [name for name in dir() if name.startswith("get_") and name not in __all__]
