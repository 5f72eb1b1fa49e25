"""The process-wide parallel mesh of one stage: which groups this rank belongs to.

Lifecycle::

    init_distributed_environment()               # torch.distributed + the world GroupCoordinator
    initialize_model_parallel(ulysses_degree=2,  # one GroupCoordinator per group kind
                              ring_degree=2, cfg_parallel_size=2)
    get_sp_group().all_gather(x, dim=1)          # use
    destroy_model_parallel(); destroy_distributed_environment()

The layout (rank order ``tp-sp-pp-cfg-dp``, Ulysses contiguous / Ring strided inside sp, and the
independent HSDP mesh) is defined by :class:`parallel.parallel_config.ParallelConfig`.

Before ``initialize_model_parallel`` every getter returns a group holding only this process, so
sizes are 1 and ranks 0: single-process model code runs unchanged, without torch.distributed.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from omni_runtime.parallel.group_coordinator import GroupCoordinator, in_the_same_node_as
from omni_runtime.parallel.parallel_config import ParallelConfig, ParallelConfigError, SequenceParallelConfig
from omni_runtime.parallel.utils import (
    divide,
    ensure_divisibility,
    get_pp_indices,
    split_tensor_along_last_dim,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GroupCoordinator", "ParallelConfig", "ParallelConfigError", "SequenceParallelConfig",
    "divide", "ensure_divisibility", "get_pp_indices", "split_tensor_along_last_dim", "in_the_same_node_as",
    "init_distributed_environment", "initialize_model_parallel", "ensure_model_parallel_initialized",
    "model_parallel_is_initialized", "destroy_model_parallel", "destroy_distributed_environment",
    "get_parallel_config", "get_sequence_parallel_config", "get_world_group", "get_sp_group", "get_ulysses_group", "get_ring_group",
    "get_pp_group", "get_cfg_group", "get_dp_group", "get_hsdp_shard_group", "get_hsdp_replicate_group",
]

# Group kinds created by initialize_model_parallel, in creation order (identical on every rank).
MODEL_GROUPS: tuple[str, ...] = ("sp", "ulysses", "ring", "pp", "cfg", "dp", "hsdp_shard", "hsdp_replicate")

_WORLD: GroupCoordinator | None = None
_GROUPS: dict[str, GroupCoordinator] = {}
_PARALLEL_CONFIG: ParallelConfig | None = None
_SINGLE: dict[tuple[str, int], GroupCoordinator] = {}
_SP_CONFIG: SequenceParallelConfig | None = None


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _single(name: str) -> GroupCoordinator:
    """The trivial group {this process}, used while the mesh is not initialized."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    key = (name, rank)
    if key not in _SINGLE:
        _SINGLE[key] = GroupCoordinator.single(rank, group_name=name)
    return _SINGLE[key]


# ---------------------------------------------------------------------- initialization
def init_distributed_environment(
    world_size: int = -1,
    rank: int = -1,
    distributed_init_method: str = "env://",
    local_rank: int = -1,
    backend: str | None = None,
) -> None:
    """Initialize torch.distributed (unless already done) and the world ``GroupCoordinator``.

    ``world_size`` / ``rank`` / ``local_rank`` default to the ``WORLD_SIZE`` / ``RANK`` /
    ``LOCAL_RANK`` environment variables. The backend defaults to nccl when CUDA is available,
    gloo otherwise. A world of one with ``env://`` and no ``MASTER_ADDR`` uses an in-process store,
    so a single process needs no rendezvous port.
    """
    global _WORLD
    if not dist.is_initialized():
        backend = backend or _default_backend()
        if world_size == -1:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if rank == -1:
            rank = int(os.environ.get("RANK", "0"))
        logger.debug("init torch.distributed: world_size=%d rank=%d backend=%s method=%s",
                     world_size, rank, backend, distributed_init_method)
        if world_size == 1 and distributed_init_method == "env://" and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend, init_method=distributed_init_method,
                                    world_size=world_size, rank=rank)
    else:
        backend = backend or str(dist.get_backend())
        if world_size not in (-1, dist.get_world_size()):
            raise ValueError(f"world_size={world_size} but torch.distributed is already initialized "
                             f"with world size {dist.get_world_size()}")
    world_size = dist.get_world_size()
    if local_rank == -1:
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if _WORLD is None:
        _WORLD = GroupCoordinator([list(range(world_size))], local_rank, backend, group_name="world")
    elif _WORLD.world_size != world_size:
        raise RuntimeError(f"world group has size {_WORLD.world_size}, torch.distributed has {world_size}")


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
    """Create every group of the mesh. Collective: all ranks call it with the same degrees.

    The data-parallel degree is inferred: ``world_size / (ulysses × ring × cfg × pp)``. HSDP is an
    independent mesh over the same ranks: ``hsdp_shard × hsdp_replicate`` must equal the world size,
    or both be 1 (disabled). Errors (``ParallelConfigError``) show the arithmetic.
    """
    global _PARALLEL_CONFIG
    config = ParallelConfig(
        ulysses_degree=ulysses_degree, ring_degree=ring_degree, cfg_parallel_size=cfg_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size, tensor_parallel_size=tensor_parallel_size,
        hsdp_shard_size=hsdp_shard_size, hsdp_replicate_size=hsdp_replicate_size,
    )
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call init_distributed_environment() first")
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel groups are already initialized: call destroy_model_parallel() first, "
                           "or ensure_model_parallel_initialized() to accept the existing mesh")
    world_size = dist.get_world_size()
    config = config.resolve(world_size)
    if _WORLD is None:
        init_distributed_environment(backend=backend)
    backend = backend or str(dist.get_backend())
    local_rank = _WORLD.local_rank
    all_groups = config.group_ranks(world_size)
    try:
        for name in MODEL_GROUPS:
            _GROUPS[name] = GroupCoordinator(all_groups[name], local_rank, backend, group_name=name)
    except BaseException:
        destroy_model_parallel()
        raise
    _PARALLEL_CONFIG = config
    SequenceParallelConfig(config.ulysses_degree, config.ring_degree).setup(
        dist.get_rank(), world_size, _GROUPS["sp"].device)
    logger.info("rank %d: mesh %s -> sp %s, ulysses %s, ring %s, pp %s, cfg %s, dp %s", dist.get_rank(), config,
                *(_GROUPS[n].ranks for n in ("sp", "ulysses", "ring", "pp", "cfg", "dp")))


def ensure_model_parallel_initialized(
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    cfg_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    hsdp_shard_size: int = 1,
    hsdp_replicate_size: int = 1,
    backend: str | None = None,
) -> None:
    """Initialize the mesh if needed; if it exists, check it has exactly these degrees."""
    if not model_parallel_is_initialized():
        initialize_model_parallel(ulysses_degree, ring_degree, cfg_parallel_size, pipeline_parallel_size,
                                  hsdp_shard_size, hsdp_replicate_size, backend)
        return
    wanted = ParallelConfig(
        ulysses_degree=ulysses_degree, ring_degree=ring_degree, cfg_parallel_size=cfg_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size, hsdp_shard_size=hsdp_shard_size,
        hsdp_replicate_size=hsdp_replicate_size,
    ).resolve(dist.get_world_size())
    if wanted != _PARALLEL_CONFIG:
        raise ParallelConfigError(f"model parallel is already initialized as {_PARALLEL_CONFIG}, "
                                  f"which differs from the requested {wanted}")


def model_parallel_is_initialized() -> bool:
    return bool(_GROUPS)


def get_sequence_parallel_config() -> SequenceParallelConfig | None:
    """The live sequence-parallel config (``convert_to_fp32`` etc.), or None without a mesh.

    ``initialize_model_parallel`` installs a default one (``convert_to_fp32=True``); calling
    ``SequenceParallelConfig(..., convert_to_fp32=False).setup(...)`` afterwards replaces it.
    """
    return _SP_CONFIG


def _set_sequence_parallel_config(config: SequenceParallelConfig | None) -> None:
    global _SP_CONFIG
    _SP_CONFIG = config


def get_parallel_config() -> ParallelConfig:
    """The resolved degrees of the live mesh (all 1 when it is not initialized)."""
    return _PARALLEL_CONFIG or ParallelConfig(data_parallel_size=1)


# ---------------------------------------------------------------------- teardown
def destroy_model_parallel() -> None:
    """Destroy every model-parallel group; getters fall back to single-process groups."""
    global _PARALLEL_CONFIG, _SP_CONFIG
    groups = list(_GROUPS.values())
    _GROUPS.clear()
    _PARALLEL_CONFIG = None
    _SP_CONFIG = None
    for group in groups:
        group.destroy()


def destroy_distributed_environment() -> None:
    """Destroy the mesh, the world group, and torch.distributed's default group."""
    global _WORLD
    destroy_model_parallel()
    if _WORLD is not None:
        _WORLD.destroy()
        _WORLD = None
    _SINGLE.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------- getters
def _get(name: str) -> GroupCoordinator:
    group = _GROUPS.get(name)
    return group if group is not None else _single(name)


def get_world_group() -> GroupCoordinator:
    return _WORLD if _WORLD is not None else _single("world")


def get_sp_group() -> GroupCoordinator:
    return _get("sp")


def get_ulysses_group() -> GroupCoordinator:
    return _get("ulysses")


def get_ring_group() -> GroupCoordinator:
    return _get("ring")


def get_pp_group() -> GroupCoordinator:
    return _get("pp")


def get_cfg_group() -> GroupCoordinator:
    return _get("cfg")


def get_dp_group() -> GroupCoordinator:
    return _get("dp")


def get_hsdp_shard_group() -> GroupCoordinator:
    return _get("hsdp_shard")


def get_hsdp_replicate_group() -> GroupCoordinator:
    return _get("hsdp_replicate")


get_pipeline_model_parallel_group = get_pp_group


def get_sequence_parallel_world_size() -> int:
    return get_sp_group().world_size


def get_sequence_parallel_rank() -> int:
    return get_sp_group().rank_in_group


def get_ulysses_parallel_world_size() -> int:
    return get_ulysses_group().world_size


def get_ulysses_parallel_rank() -> int:
    return get_ulysses_group().rank_in_group


def get_ring_parallel_world_size() -> int:
    return get_ring_group().world_size


def get_ring_parallel_rank() -> int:
    return get_ring_group().rank_in_group


def get_pipeline_parallel_world_size() -> int:
    return get_pp_group().world_size


def get_pipeline_parallel_rank() -> int:
    return get_pp_group().rank_in_group


def get_classifier_free_guidance_world_size() -> int:
    return get_cfg_group().world_size


def get_classifier_free_guidance_rank() -> int:
    return get_cfg_group().rank_in_group


def get_data_parallel_world_size() -> int:
    return get_dp_group().world_size


def get_data_parallel_rank() -> int:
    return get_dp_group().rank_in_group


def get_hsdp_shard_world_size() -> int:
    return get_hsdp_shard_group().world_size


def get_hsdp_shard_rank() -> int:
    return get_hsdp_shard_group().rank_in_group


def get_hsdp_replicate_world_size() -> int:
    return get_hsdp_replicate_group().world_size


def get_hsdp_replicate_rank() -> int:
    return get_hsdp_replicate_group().rank_in_group


get_fully_shard_world_size = get_hsdp_shard_world_size


def get_world_size() -> int:
    return get_world_group().world_size


def get_world_rank() -> int:
    return get_world_group().rank_in_group
