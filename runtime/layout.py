"""Group arithmetic of a stage replica: for each rank, the ranks of each of its parallel groups.

Rank order inside a denoiser replica follows the project's mesh convention ``tp-sp-pp-cfg-dp`` (the first varies
fastest); inside sp, Ulysses groups are contiguous and Ring groups strided. Pure arithmetic, used by
:func:`runtime.placement.compute_placement` (which ``omni-runtime check`` prints and the launcher starts).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def denoiser_groups(ulysses: int, ring: int, cfg: int, pp: int) -> list[dict[str, list[int]]]:
    """For each rank of a ``ulysses x ring x pp x cfg`` mesh, the global ranks of each of its groups
    (``parallel.parallel_config.ParallelConfig.group_ranks``, the same arithmetic the stage processes use)."""
    from omni_runtime.parallel.parallel_config import ParallelConfig

    pc = ParallelConfig(ulysses_degree=ulysses, ring_degree=ring, cfg_parallel_size=cfg, pipeline_parallel_size=pp)
    world = ulysses * ring * cfg * pp
    all_groups = pc.group_ranks(world)
    names = ("world", "sp", "ulysses", "ring", "pp", "cfg")
    return [{n: next(list(g) for g in all_groups[n] if r in g) for n in names} for r in range(world)]
