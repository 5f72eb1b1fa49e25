"""The resolved process layout of a config: stages, replicas, ranks, devices and each rank's parallel groups.

Each replica's groups come from :func:`rank_groups`, i.e. ``ParallelSpec.group_ranks()`` (rank order
``tp-sp-pp-cfg-dp``, Ulysses contiguous, Ring strided, see :mod:`parallel.parallel_spec`): the same arithmetic
``Mesh.build`` uses in the workers, so ``omni-runtime check`` prints the groups the workers build. This is pure
arithmetic, used by ``check`` and by the launcher to place ranks on devices.
"""

from __future__ import annotations

import logging

import msgspec

from omni_runtime.parallel.parallel_spec import ParallelSpec
from omni_runtime.runtime.config import STAGE_NAMES, RuntimeConfig

logger = logging.getLogger(__name__)


class RankLayout(msgspec.Struct, kw_only=True):
    rank: int
    device: str
    groups: dict[str, list[int]]  # group name -> global ranks of the group this rank belongs to


class ReplicaLayout(msgspec.Struct, kw_only=True):
    stage: str
    replica: int
    world_size: int
    ranks: list[RankLayout]


def rank_groups(spec: ParallelSpec) -> list[dict[str, list[int]]]:
    """For each rank of ``spec``'s world, the global ranks of each of its groups (every name of
    ``parallel.parallel_spec.GROUP_NAMES``): what ``check`` prints and what ``Mesh.build`` creates in the workers."""
    return [spec.groups_of(r) for r in range(spec.world_size)]


def shown_groups(groups: dict[str, list[int]]) -> dict[str, list[int]]:
    """The groups ``check`` prints for a rank: the world group and every group of more than one rank."""
    return {k: v for k, v in groups.items() if k == "world" or len(v) > 1}


def device_for(cfg: RuntimeConfig, stage: str, index: int) -> str:
    """The device of global rank ``index`` of ``stage`` (replica-major): what ``check`` prints and the launcher uses."""
    devices = cfg.stages.get(stage).devices
    if devices:  # the config has normalized indices to "cuda:N"
        return devices[index]
    return cfg.model.device if cfg.model.device == "cpu" else f"cuda:{index}"


def resolve_layout(cfg: RuntimeConfig) -> list[ReplicaLayout]:
    """Every replica of every stage, with each rank's device and groups."""
    out: list[ReplicaLayout] = []
    for stage in STAGE_NAMES:
        st = cfg.stages.get(stage)
        ws = st.world_size
        spec = getattr(st, "parallel", None) or ParallelSpec()
        groups = rank_groups(spec)
        for rep in range(st.replicas):
            ranks = [RankLayout(rank=r, device=device_for(cfg, stage, rep * ws + r), groups=groups[r])
                     for r in range(ws)]
            out.append(ReplicaLayout(stage=stage, replica=rep, world_size=ws, ranks=ranks))
    return out


def format_layout(cfg: RuntimeConfig) -> str:
    """A human-readable description of the layout, as printed by ``omni-runtime check``."""
    lines = [f"config: {cfg.source or '(in code)'}",
             f"model: {cfg.model.path} ({cfg.model.dtype} on {cfg.model.device})",
             f"server: http://{cfg.server.host}:{cfg.server.port} (auth: {'on' if cfg.server.api_key else 'off'}, "
             f"max_queue {cfg.server.max_queue}/stage, timeout {cfg.server.request_timeout_s:g}s)"]
    total = 0
    for rep in resolve_layout(cfg):
        st = cfg.stages.get(rep.stage)
        if rep.replica == 0:
            spec = getattr(st, "parallel", None)
            extra = f", parallel: {spec.describe()}" if spec is not None else ""
            lines.append(f"stage {rep.stage}: {st.replicas} replica(s) x {rep.world_size} rank(s), "
                         f"max_batch_size {st.max_batch_size}, batch_timeout_ms {st.batch_timeout_ms:g}{extra}")
        for rk in rep.ranks:
            total += 1
            groups = " ".join(f"{k}={v}" for k, v in shown_groups(rk.groups).items())
            lines.append(f"  {rep.stage}[{rep.replica}] rank {rk.rank}/{rep.world_size} on {rk.device}: {groups}")
    lines.append(f"total processes: {total} rank(s) + 1 frontend")
    return "\n".join(lines)
