"""Group arithmetic of a stage replica: for each rank, the global ranks of each of its parallel groups.

Each replica's groups come from :func:`rank_groups`, i.e. ``ParallelSpec.group_ranks()`` (rank order
``tp-sp-pp-cfg-dp``, Ulysses contiguous, Ring strided, see :mod:`parallel.parallel_spec`): the same arithmetic
``Mesh.build`` uses in the workers, so ``omni-runtime check`` (through :func:`runtime.placement.compute_placement`)
prints the groups the workers build. :func:`vae_row_lines` is the VAE's row split over its ``vae_patch`` group
(``parallel.vae_patch_parallel.vae_row_ranges``), which ``check --size`` prints next to the placement.
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


#: pixels per latent row of the FLUX VAE (and the tiny model's): what ``check`` assumes for the VAE row split
VAE_SCALE_FACTOR = 8


def vae_row_lines(patch: int, width: int, height: int, scale: int = VAE_SCALE_FACTOR) -> list[str]:
    """One line per VAE patch rank (group rank of ``vae_patch``): the latent rows and image rows it decodes for a
    ``width x height`` image (``parallel.vae_patch_parallel.vae_row_ranges``, the split the ranks use)."""
    from omni_runtime.parallel.vae_patch_parallel import vae_row_ranges

    rows = height // scale
    ranges = vae_row_ranges(rows, patch)
    if any(e == s for s, e in ranges):
        return [f"  vae rows for {width}x{height}: {rows} latent rows < {patch} patch ranks, rank 0 decodes alone"]
    out = [f"  vae rows for {width}x{height} ({rows} latent rows, {scale} pixels each):"]
    out += [f"    rank {r}: latent rows [{s}, {e}) -> image rows [{s * scale}, {e * scale})"
            for r, (s, e) in enumerate(ranges)]
    return out


def pp_block_lines(spec: ParallelSpec, blocks: list[tuple[str, int]]) -> list[str]:
    """One line per pipeline stage of a denoiser replica: its ranks, the blocks it holds (``get_pp_indices`` over
    the concatenation of ``blocks``, (module list name, length) in execution order: the split the ranks load) and
    the embedders / head. A :class:`parallel.strategies.pipeline_parallel.PipelineError` names ``pp`` when there
    are fewer blocks than stages."""
    from omni_runtime.parallel.strategies.pipeline_parallel import block_ranges

    total = sum(n for _, n in blocks)
    ranges = block_ranges(total, spec.pp)
    stages = spec.group_ranks()["pp"]
    kinds = " + ".join(f"{n} {name}" for name, n in blocks)
    out = [f"  pp stages ({total} blocks: {kinds}):"]
    for s, (a, b) in enumerate(ranges):
        ranks = sorted(g[s] for g in stages)
        parts, start = [], 0
        for name, n in blocks:
            lo, hi = max(a, start), min(b, start + n)
            if lo < hi:
                parts.append(f"{name}[{lo - start}:{hi - start}]")
            start += n
        extra = (" + embedders" if s == 0 else "") + (" + head" if s == spec.pp - 1 else "")
        out.append(f"    pp rank {s} (ranks {ranks}): blocks [{a}, {b}) = {' + '.join(parts)}{extra}")
    return out
