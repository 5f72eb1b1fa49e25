"""Group arithmetic of a stage replica: for each rank, the global ranks of each of its parallel groups.

Each replica's groups come from :func:`rank_groups`, i.e. ``ParallelSpec.group_ranks()`` (rank order
``tp-sp-pp-cfg-dp``, Ulysses contiguous, Ring strided, see :mod:`parallel.parallel_spec`): the same arithmetic
``Mesh.build`` uses in the workers, so ``omni-runtime check`` (through :func:`runtime.placement.compute_placement`)
prints the groups the workers build.
"""

from __future__ import annotations

import logging

from omni_runtime.parallel.parallel_spec import ParallelSpec

logger = logging.getLogger(__name__)


def rank_groups(spec: ParallelSpec) -> list[dict[str, list[int]]]:
    """For each rank of ``spec``'s world, the global ranks of each of its groups (every name of
    ``parallel.parallel_spec.GROUP_NAMES``): what ``check`` prints and what ``Mesh.build`` creates in the workers."""
    return [spec.groups_of(r) for r in range(spec.world_size)]


def shown_groups(groups: dict[str, list[int]]) -> dict[str, list[int]]:
    """The groups ``check`` prints for a rank: the world group and every group of more than one rank."""
    return {k: v for k, v in groups.items() if k == "world" or len(v) > 1}
