"""The resolved process layout of a config: stages, replicas, ranks, devices and each rank's parallel groups.

Rank order inside a denoiser replica follows the project's mesh convention ``tp-sp-pp-cfg-dp`` (the first varies
fastest); inside sp, Ulysses groups are contiguous and Ring groups strided. This is pure arithmetic, used by
``omni-runtime check`` and by the launcher to place ranks on devices.
"""

from __future__ import annotations

import logging

import msgspec

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


def denoiser_groups(ulysses: int, ring: int, cfg: int, pp: int, hsdp_shard: int = 1,
                    hsdp_replicate: int = 1) -> list[dict[str, list[int]]]:
    """For each rank of a ``ulysses x ring x pp x cfg`` mesh (HSDP sharding across the same ranks, or alone), the
    global ranks of each of its groups (``parallel.parallel_config.ParallelConfig.group_ranks``, the same
    arithmetic the stage processes use)."""
    from omni_runtime.parallel.parallel_config import ParallelConfig

    pc = ParallelConfig(ulysses_degree=ulysses, ring_degree=ring, cfg_parallel_size=cfg, pipeline_parallel_size=pp,
                        hsdp_shard_size=hsdp_shard, hsdp_replicate_size=hsdp_replicate)
    world = max(ulysses * ring * cfg * pp, hsdp_shard * hsdp_replicate)
    all_groups = pc.group_ranks(world)
    names = ("world", "sp", "ulysses", "ring", "pp", "cfg")
    if hsdp_shard * hsdp_replicate > 1:
        names += ("hsdp_shard", "hsdp_replicate")
    return [{n: next(list(g) for g in all_groups[n] if r in g) for n in names} for r in range(world)]


def hsdp_groups(hsdp_shard: int, hsdp_replicate: int) -> list[dict[str, list[int]]]:
    """For each rank of a stage whose only degree is HSDP (the text encoder), its world and HSDP groups."""
    world = hsdp_shard * hsdp_replicate
    return [{"world": list(range(world)),
             "hsdp_shard": [r // hsdp_shard * hsdp_shard + i for i in range(hsdp_shard)],
             "hsdp_replicate": [r % hsdp_shard + j * hsdp_shard for j in range(hsdp_replicate)]}
            for r in range(world)]


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
        if stage == "denoiser":
            p = cfg.stages.denoiser.parallel
            groups = denoiser_groups(p.ulysses, p.ring, p.cfg, p.pp, p.hsdp_shard, p.hsdp_replicate)
        elif stage == "vae":
            groups = [{"world": list(range(ws)), "patch": list(range(ws))} for _ in range(ws)]
        else:
            te = cfg.stages.text_encoder.parallel
            groups = hsdp_groups(te.hsdp_shard, te.hsdp_replicate) if ws > 1 else [{"world": [0]}]
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
            extra = ""
            if rep.stage == "denoiser":
                p = cfg.stages.denoiser.parallel
                extra = (f", ulysses {p.ulysses} x ring {p.ring} x pp {p.pp} x cfg {p.cfg}"
                         f", hsdp {p.hsdp_shard}x{p.hsdp_replicate}")
            elif rep.stage == "vae":
                extra = f", patch {cfg.stages.vae.parallel.patch}"
            elif rep.world_size > 1:
                te = cfg.stages.text_encoder.parallel
                extra = f", hsdp {te.hsdp_shard}x{te.hsdp_replicate}"
            lines.append(f"stage {rep.stage}: {st.replicas} replica(s) x {rep.world_size} rank(s), "
                         f"max_batch_size {st.max_batch_size}, batch_timeout_ms {st.batch_timeout_ms:g}{extra}")
        for rk in rep.ranks:
            total += 1
            groups = " ".join(f"{k}={v}" for k, v in rk.groups.items())
            lines.append(f"  {rep.stage}[{rep.replica}] rank {rk.rank}/{rep.world_size} on {rk.device}: {groups}")
    lines.append(f"total processes: {total} rank(s) + 1 frontend")
    return "\n".join(lines)
