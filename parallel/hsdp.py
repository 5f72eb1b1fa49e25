"""HSDP for inference: FSDP2 ``fully_shard`` on a 2-D ``(replicate, shard)`` DeviceMesh, one unit per block.

Each rank keeps ``1 / hsdp_shard`` of every parameter (``Shard(0)`` across the shard dimension, ``Replicate()``
across the replicate dimension). Before a unit's forward its weights are all-gathered across the shard group, and
after it (``reshard_after_forward``) they are freed again, so a rank holds its shards plus one unit's full weights.
This works under ``torch.no_grad()``: nothing here needs autograd.

Which submodules become units is the model's choice: next to its ``_sp_plan`` a model declares
``_hsdp_shard_conditions``, a list of predicates ``(qualified_name, module) -> bool``; every submodule for which
one holds is wrapped, bottom-up, then the root (which keeps every parameter no unit took). A model that declares
nothing is one unit (the whole model all-gathered at once) and a warning says so.

Nothing here reads process-global state: the mesh is an argument. :func:`hsdp_config_from_mesh` is the one
place a stage's :class:`~parallel.mesh.Mesh` becomes an :class:`HSDPInferenceConfig` (its ``hsdp_replicate`` /
``hsdp_shard`` groups whose backend takes the weights' device, ``GroupCoordinator.group_for``, turned into a
DeviceMesh by :func:`hsdp_device_mesh_from_groups`, no new process groups); :func:`build_hsdp_device_mesh` lays one
out over the default world (tests, benchmarks).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from omni_runtime.parallel.hsdp_release import release_after_forward
from omni_runtime.parallel.parallel_spec import hsdp_world_error

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from omni_runtime.parallel.mesh import Mesh

# torch.distributed.fsdp / torch.distributed.tensor are imported where they are used: importing them pulls in sympy
# (~0.7 s of CPU), which every rank process (and the frontend) would otherwise pay at start-up, sharded or not.

logger = logging.getLogger(__name__)

#: A wrap condition: ``(qualified module name, module) -> wrap it as one FSDP unit``.
ShardCondition = Callable[[str, nn.Module], bool]

MESH_DIM_NAMES = ("replicate", "shard")


class HSDPConfigError(ValueError):
    """HSDP degrees or a mesh that cannot work; the message shows the arithmetic."""


def block_list_condition(*list_names: str) -> ShardCondition:
    """A condition matching the items of the named ``nn.ModuleList`` attributes (``transformer_blocks.3``...).

    ``list_names`` are qualified names relative to the root (``encoder.block``)."""
    patterns = [re.compile(rf"^{re.escape(n)}\.\d+$") for n in list_names]

    def condition(name: str, module: nn.Module) -> bool:
        return any(p.match(name) for p in patterns)

    condition.__name__ = f"items_of({', '.join(list_names)})"
    return condition


@dataclass
class HSDPInferenceConfig:
    """How to shard a model's weights for inference.

    ``hsdp_shard_size`` ranks split each parameter; ``hsdp_replicate_size`` such groups each hold a full copy; their
    product is the number of ranks the model spans. ``param_dtype`` / ``reduce_dtype`` form the FSDP2
    ``MixedPrecisionPolicy`` (None keeps the loaded dtype). ``forward_prefetch``: each unit starts the all-gather
    of the next one (in model order) before it computes, so communication can overlap compute where the backend
    runs collectives asynchronously (NCCL streams; see docs/BENCHMARKS.md for gloo). ``device_mesh`` is the 2-D ``(replicate, shard)`` mesh
    (a 1-D ``shard`` mesh is accepted when ``hsdp_replicate_size == 1``); when None, :func:`apply_hsdp_to_model`
    builds one over the default process group. ``shard_conditions`` overrides the model's
    ``_hsdp_shard_conditions``. ``release_after_forward``: after each forward of the root, the freed heap pages
    (the all-gathered weights of every unit) go back to the OS (``parallel.hsdp_release``; CPU weights only).
    """

    hsdp_shard_size: int = 1
    hsdp_replicate_size: int = 1
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    reshard_after_forward: bool = True
    forward_prefetch: bool = False
    release_after_forward: bool = True
    device_mesh: DeviceMesh | None = None
    shard_conditions: Sequence[ShardCondition] | None = None
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("hsdp_shard_size", "hsdp_replicate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HSDPConfigError(f"{name} = {value!r}: must be an integer >= 1")

    @property
    def world_size(self) -> int:
        """Ranks the model spans: ``hsdp_shard_size × hsdp_replicate_size``."""
        return self.hsdp_shard_size * self.hsdp_replicate_size

    @property
    def enabled(self) -> bool:
        return self.hsdp_shard_size > 1

    @property
    def mp_policy(self) -> MixedPrecisionPolicy:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype,
                                    output_dtype=None, cast_forward_inputs=self.param_dtype is not None)

    def check_world_size(self, world_size: int) -> None:
        """Raise :class:`HSDPConfigError` unless the degrees multiply to ``world_size``."""
        if self.world_size != world_size:  # 1 x 1 too: this config is used only to shard
            raise HSDPConfigError(hsdp_world_error(self.hsdp_shard_size, self.hsdp_replicate_size, world_size)
                                  or f"hsdp_shard 1 × hsdp_replicate 1 shards nothing over world size {world_size}")


def hsdp_rank_layout(shard_size: int, replicate_size: int) -> torch.Tensor:
    """Global ranks as a ``(replicate, shard)`` grid: ``rank = shard_i + shard_size * replicate_i`` (shard groups
    contiguous, replicate groups strided)."""
    return torch.arange(shard_size * replicate_size, dtype=torch.int).view(replicate_size, shard_size)


def build_hsdp_device_mesh(shard_size: int, replicate_size: int = 1, device_type: str = "cpu") -> DeviceMesh:
    """A ``(replicate, shard)`` DeviceMesh over the default process group; collective on every rank of it."""
    if not dist.is_initialized():
        raise HSDPConfigError("HSDP needs torch.distributed initialized (one process per rank)")
    world = dist.get_world_size()
    if shard_size * replicate_size != world:
        raise HSDPConfigError(hsdp_world_error(shard_size, replicate_size, world)
                              or f"hsdp_shard 1 × hsdp_replicate 1 shards nothing over world size {world}")
    return DeviceMesh(device_type, hsdp_rank_layout(shard_size, replicate_size), mesh_dim_names=MESH_DIM_NAMES)


def hsdp_device_mesh_from_groups(replicate_group: dist.ProcessGroup | None, shard_group: dist.ProcessGroup,
                                 shard_size: int, replicate_size: int, device_type: str = "cpu") -> DeviceMesh:
    """A DeviceMesh over existing process groups (no new groups are created): ``(replicate, shard)``, or the 1-D
    ``shard`` mesh when ``replicate_size == 1`` (``replicate_group`` is then not used).

    The groups must follow :func:`hsdp_rank_layout` (e.g. a ``Mesh``'s ``hsdp_replicate`` / ``hsdp_shard`` device
    groups); ``shard_size × replicate_size`` must be the default world's size."""
    if replicate_size == 1:
        return DeviceMesh.from_group(shard_group, device_type, mesh_dim_names=MESH_DIM_NAMES[1:])
    if replicate_group is None:
        raise HSDPConfigError(f"hsdp_replicate {replicate_size} needs the replicate process group")
    return DeviceMesh.from_group([replicate_group, shard_group], device_type,
                                 mesh=hsdp_rank_layout(shard_size, replicate_size), mesh_dim_names=MESH_DIM_NAMES)


def hsdp_config_from_mesh(mesh: Mesh, **options: object) -> HSDPInferenceConfig | None:
    """The HSDP config of a stage rank built on ``mesh``: its spec's ``hsdp_shard`` / ``hsdp_replicate`` degrees
    and a DeviceMesh over the mesh's ``hsdp_replicate`` / ``hsdp_shard`` groups whose backend takes the mesh's
    device (nccl for CUDA weights, gloo for CPU ones: ``GroupCoordinator.group_for``). None when the spec does not
    shard the weights (``hsdp_shard == 1``). ``options`` are further :class:`HSDPInferenceConfig` fields
    (``param_dtype``, ``forward_prefetch``, ...); ``release_after_forward`` is the spec's ``hsdp_release_memory``
    unless given. Not collective: the groups exist already (``Mesh.build`` made them)."""
    shard, replicate = mesh.spec.hsdp_shard, mesh.spec.hsdp_replicate
    if shard <= 1:
        return None
    options = {"release_after_forward": mesh.spec.hsdp_release_memory, **options}
    device_type = mesh.device.type  # the groups whose backend takes the weights' device (gloo for CPU weights)
    replicate_group = mesh.group("hsdp_replicate").group_for(mesh.device) if replicate > 1 else None
    device_mesh = hsdp_device_mesh_from_groups(replicate_group, mesh.group("hsdp_shard").group_for(mesh.device),
                                               shard, replicate, device_type)
    return HSDPInferenceConfig(hsdp_shard_size=shard, hsdp_replicate_size=replicate, device_mesh=device_mesh,
                               device_type=device_type, **options)  # type: ignore[arg-type]


def _mesh_for(model: nn.Module, cfg: HSDPInferenceConfig) -> DeviceMesh:
    mesh = cfg.device_mesh
    if mesh is None:
        mesh = build_hsdp_device_mesh(cfg.hsdp_shard_size, cfg.hsdp_replicate_size, cfg.device_type)
        cfg.device_mesh = mesh
    if mesh.ndim == 2:
        shape = (cfg.hsdp_replicate_size, cfg.hsdp_shard_size)
        if tuple(mesh.shape) != shape:
            raise HSDPConfigError(f"device_mesh has shape {tuple(mesh.shape)}; HSDP needs (replicate, shard) = "
                                  f"{shape}")
        if cfg.hsdp_replicate_size == 1:  # a plain FSDP mesh: no replicate dimension to all-reduce over
            return mesh[MESH_DIM_NAMES[1]] if mesh.mesh_dim_names else mesh
        return mesh
    if mesh.ndim == 1 and cfg.hsdp_replicate_size == 1 and mesh.size() == cfg.hsdp_shard_size:
        return mesh
    raise HSDPConfigError(f"device_mesh {mesh} does not fit hsdp_shard {cfg.hsdp_shard_size} × hsdp_replicate "
                          f"{cfg.hsdp_replicate_size}")


def shard_conditions_of(model: nn.Module, cfg: HSDPInferenceConfig | None = None) -> list[ShardCondition]:
    """The wrap conditions: ``cfg.shard_conditions`` if set, else the model's ``_hsdp_shard_conditions``."""
    if cfg is not None and cfg.shard_conditions is not None:
        return list(cfg.shard_conditions)
    return list(getattr(model, "_hsdp_shard_conditions", None) or [])


def hsdp_units(model: nn.Module, conditions: Sequence[ShardCondition]) -> list[tuple[str, nn.Module]]:
    """The submodules to wrap, deepest first (FSDP2 wraps children before their parents); never the root."""
    found = [(name, m) for name, m in model.named_modules() if name and any(c(name, m) for c in conditions)]
    return sorted(found, key=lambda nm: -nm[0].count("."))  # stable: same-depth units keep model order


def apply_hsdp_to_model(model: nn.Module, hsdp_config: HSDPInferenceConfig) -> nn.Module:
    """Shard ``model``'s parameters in place with FSDP2 and return it.

    The model may hold its loaded weights (each rank keeps its shards and frees the rest) or live on the meta
    device (then :func:`stages.sharded_load` fills each rank's shards). Every rank of the mesh must call this
    with the same model structure (collective).
    """
    from torch.distributed.fsdp import fully_shard

    name = type(model).__name__  # fully_shard renames the class (FSDP<name>)
    mesh = _mesh_for(model, hsdp_config)
    conditions = shard_conditions_of(model, hsdp_config)
    units = hsdp_units(model, conditions)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    if not units:
        logger.warning("%s declares no _hsdp_shard_conditions (or none matched): the whole model is one HSDP unit "
                       "and every forward all-gathers all of its weights at once", name)
    kwargs = dict(mesh=mesh, reshard_after_forward=hsdp_config.reshard_after_forward,
                  mp_policy=hsdp_config.mp_policy)
    for _, module in units:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    if hsdp_config.release_after_forward and hsdp_config.device_type == "cpu":
        release_after_forward(model)  # registered after FSDP's hooks: runs once the root has resharded
    if hsdp_config.forward_prefetch and len(units) > 1:
        in_order = [m for _, m in sorted(units, key=lambda nm: order[nm[0]])]
        for current, following in pairwise(in_order):
            current.set_modules_to_forward_prefetch([following])
    logger.info("HSDP: %s sharded over %s (shard %d x replicate %d), %d units + root", name,
                mesh.mesh.tolist(), hsdp_config.hsdp_shard_size, hsdp_config.hsdp_replicate_size, len(units))
    return model


def get_fully_shard_world_size(model_or_config: nn.Module | HSDPInferenceConfig) -> int:
    """The number of ranks one parameter is split over (the shard degree) for a config or an HSDP-wrapped model;
    1 for a model that is not sharded."""
    from torch.distributed.tensor import DTensor

    if isinstance(model_or_config, HSDPInferenceConfig):
        return model_or_config.hsdp_shard_size
    for p in model_or_config.parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            return mesh.size(mesh.ndim - 1)
        break
    return 1


def is_hsdp_model(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage this rank holds: the local shards of DTensor parameters, else full tensors."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total
