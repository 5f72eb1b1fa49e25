"""The parallel degrees of one stage, validated, and the rank groups they imply.

``ParallelConfig`` holds ``ulysses``, ``ring``, ``cfg``, ``pp``, ``tp`` (reserved at 1), ``dp``
(inferred from the world size) and the independent HSDP mesh ``hsdp_shard`` × ``hsdp_replicate``.

Rank layout (a pure function of the degrees, see :meth:`ParallelConfig.group_ranks`):

* model mesh, order ``tp-sp-pp-cfg-dp`` with the first dimension varying fastest::

      global_rank = tp_i + tp * (sp_i + sp * (pp_i + pp * (cfg_i + cfg * dp_i)))

  and inside sp, ``sp_i = ulysses_i + ulysses * ring_i`` (Ulysses fastest), so Ulysses groups are
  contiguous ranks (all-to-all on the fastest links) and Ring groups are strided.
* HSDP mesh, over the same ranks: ``global_rank = shard_i + hsdp_shard * replicate_i`` — shard
  groups are contiguous, replicate groups strided. Either ``hsdp_shard × hsdp_replicate`` equals the
  world size, or both are 1, which disables HSDP: then every rank is its own (size 1) shard group
  and its own replicate group, i.e. every rank holds full weights and nothing is exchanged.

``SequenceParallelConfig`` is the small view of the sequence-parallel degrees that attention code
carries around; its getters read the live mesh from :mod:`parallel.state`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Model mesh dimensions, fastest-varying first.
MESH_DIMS: tuple[str, ...] = ("tp", "ulysses", "ring", "pp", "cfg", "dp")

# Which mesh dimensions each named group spans.
GROUP_DIMS: dict[str, tuple[str, ...]] = {
    "world": MESH_DIMS,
    "tp": ("tp",),
    "sp": ("ulysses", "ring"),
    "ulysses": ("ulysses",),
    "ring": ("ring",),
    "pp": ("pp",),
    "cfg": ("cfg",),
    "dp": ("dp",),
    # expert parallelism spans the data-parallel x sequence-parallel ranks (vLLM's rule)
    "ep": ("ulysses", "ring", "dp"),
}

GROUP_NAMES: tuple[str, ...] = (*GROUP_DIMS, "hsdp_shard", "hsdp_replicate")


class ParallelConfigError(ValueError):
    """A parallel degree the user chose is invalid or does not fit the world size."""


def _mesh_groups(sizes: dict[str, int], members: tuple[str, ...]) -> list[list[int]]:
    """All groups of ranks that vary only along ``members`` (the others fixed).

    ``sizes`` maps each dimension to its degree, in fastest-first order. Ranks inside a group are
    ascending (so a rank's index in the list is its rank in the group); groups are ordered by their
    first rank.
    """
    names = list(sizes)
    strides: dict[str, int] = {}
    stride = 1
    for name in names:
        strides[name] = stride
        stride *= sizes[name]
    member_dims = [n for n in names if n in members]
    other_dims = [n for n in names if n not in members]

    def offsets(dims: list[str]) -> list[int]:
        # slowest dimension outermost, so the offsets come out ascending
        ranges = [range(sizes[d]) for d in reversed(dims)]
        return [
            sum(i * strides[d] for i, d in zip(idx, reversed(dims), strict=True))
            for idx in itertools.product(*ranges)
        ]

    groups = [[base + off for off in offsets(member_dims)] for base in offsets(other_dims)]
    return sorted(groups, key=lambda g: g[0])


def _check_degree(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParallelConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel degrees of one stage. ``data_parallel_size=None`` means: infer from the world size.

    Construction checks each degree on its own (positive int; tp must be 1). Checks against the
    world size happen in :meth:`resolve` / :meth:`group_ranks`, whose messages show the arithmetic.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    tensor_parallel_size: int = 1
    data_parallel_size: int | None = None
    hsdp_shard_size: int = 1
    hsdp_replicate_size: int = 1

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "data_parallel_size" and value is None:
                continue
            _check_degree(field.name, value)
        if self.tensor_parallel_size != 1:
            raise ParallelConfigError(
                f"tensor_parallel_size={self.tensor_parallel_size}: tensor parallelism is reserved; tp must be 1"
            )

    # ----------------------------------------------------------------- derived sizes
    @property
    def sequence_parallel_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def model_parallel_size(self) -> int:
        """Ranks that cooperate on one replica: tp × sp × pp × cfg."""
        return (self.tensor_parallel_size * self.sequence_parallel_size
                * self.pipeline_parallel_size * self.cfg_parallel_size)

    @property
    def hsdp_enabled(self) -> bool:
        return self.hsdp_shard_size * self.hsdp_replicate_size > 1

    def _product_text(self) -> str:
        return (f"ulysses {self.ulysses_degree} × ring {self.ring_degree} × cfg {self.cfg_parallel_size}"
                f" × pp {self.pipeline_parallel_size}")

    # ----------------------------------------------------------------- world checks
    def resolve(self, world_size: int) -> ParallelConfig:
        """Check the degrees against ``world_size``; return a copy with ``data_parallel_size`` set."""
        _check_degree("world_size", world_size)
        mp = self.model_parallel_size
        if self.data_parallel_size is None:
            if world_size % mp != 0:
                raise ParallelConfigError(
                    f"{self._product_text()} = {mp} does not divide world size {world_size}"
                )
            dp = world_size // mp
        else:
            dp = self.data_parallel_size
            if mp * dp != world_size:
                raise ParallelConfigError(
                    f"{self._product_text()} × dp {dp} = {mp * dp} does not equal world size {world_size}"
                )
        hsdp = self.hsdp_shard_size * self.hsdp_replicate_size
        if hsdp != 1 and hsdp != world_size:
            raise ParallelConfigError(
                f"hsdp_shard {self.hsdp_shard_size} × hsdp_replicate {self.hsdp_replicate_size} = {hsdp} "
                f"does not equal world size {world_size} (set both to 1 to disable HSDP)"
            )
        return dataclasses.replace(self, data_parallel_size=dp)

    def mesh_sizes(self, world_size: int) -> dict[str, int]:
        """Degree of each model-mesh dimension, fastest-varying first (``MESH_DIMS`` order)."""
        resolved = self.resolve(world_size)
        return {
            "tp": resolved.tensor_parallel_size,
            "ulysses": resolved.ulysses_degree,
            "ring": resolved.ring_degree,
            "pp": resolved.pipeline_parallel_size,
            "cfg": resolved.cfg_parallel_size,
            "dp": int(resolved.data_parallel_size or 1),
        }

    def group_ranks(self, world_size: int) -> dict[str, list[list[int]]]:
        """Every group of every kind, as global ranks: ``{name: [[ranks of group 0], ...]}``.

        Names: ``world, tp, sp, ulysses, ring, pp, cfg, dp, hsdp_shard, hsdp_replicate``. Pure: no
        processes needed. Within a group, a rank's index is its rank in the group.
        """
        sizes = self.mesh_sizes(world_size)
        groups = {name: _mesh_groups(sizes, dims) for name, dims in GROUP_DIMS.items()}
        if self.hsdp_enabled:
            hsdp_sizes = {"shard": self.hsdp_shard_size, "replicate": self.hsdp_replicate_size}
            groups["hsdp_shard"] = _mesh_groups(hsdp_sizes, ("shard",))
            groups["hsdp_replicate"] = _mesh_groups(hsdp_sizes, ("replicate",))
        else:
            groups["hsdp_shard"] = [[r] for r in range(world_size)]
            groups["hsdp_replicate"] = [[r] for r in range(world_size)]
        return groups


@dataclass
class SequenceParallelConfig:
    """The sequence-parallel degrees attention code carries (diffusers' ``ContextParallelConfig``).

    ``ulysses_degree × ring_degree`` is the sequence-parallel size; both > 1 is the hybrid.
    ``convert_to_fp32``: ring attention keeps the output and log-sum-exp in fp32 while merging.
    :meth:`setup` binds it to the live mesh in :mod:`parallel.state`; the ``get_*`` methods then read
    ranks and sizes from there (and raise ``RuntimeError`` before ``setup``).
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    convert_to_fp32: bool = True

    _rank: int | None = dataclasses.field(default=None, init=False, repr=False)
    _world_size: int | None = dataclasses.field(default=None, init=False, repr=False)
    _device: torch.device | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_degree("ulysses_degree", self.ulysses_degree)
        _check_degree("ring_degree", self.ring_degree)

    @property
    def sequence_parallel_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def setup(self, rank: int, world_size: int, device: torch.device) -> None:
        """Bind to the runtime mesh; its Ulysses and Ring sizes must equal this config's.

        With a live mesh this config becomes :func:`parallel.state.get_sequence_parallel_config`
        (so ``convert_to_fp32`` reaches the attention code).
        """
        from omni_runtime.parallel import state

        if state.model_parallel_is_initialized():
            live = (state.get_ulysses_parallel_world_size(), state.get_ring_parallel_world_size())
            if live != (self.ulysses_degree, self.ring_degree):
                raise ParallelConfigError(
                    f"SequenceParallelConfig(ulysses_degree={self.ulysses_degree}, ring_degree={self.ring_degree}) "
                    f"does not match the initialized mesh (ulysses {live[0]}, ring {live[1]})"
                )
        elif self.sequence_parallel_size != 1:
            raise RuntimeError(
                f"sequence parallel size {self.sequence_parallel_size} needs initialize_model_parallel() first"
            )
        self._rank, self._world_size, self._device = rank, world_size, device
        if state.model_parallel_is_initialized():
            state._set_sequence_parallel_config(self)

    def is_initialized(self) -> bool:
        return self._rank is not None

    def _require_setup(self) -> None:
        if not self.is_initialized():
            raise RuntimeError("SequenceParallelConfig.setup() has not been called")

    def get_world_size(self) -> int:
        from omni_runtime.parallel import state

        self._require_setup()
        return state.get_sequence_parallel_world_size()

    def get_rank(self) -> int:
        from omni_runtime.parallel import state

        self._require_setup()
        return state.get_sequence_parallel_rank()

    def get_ulysses_world_size(self) -> int:
        from omni_runtime.parallel import state

        return state.get_ulysses_parallel_world_size()

    def get_ulysses_rank(self) -> int:
        from omni_runtime.parallel import state

        return state.get_ulysses_parallel_rank()

    def get_ring_world_size(self) -> int:
        from omni_runtime.parallel import state

        return state.get_ring_parallel_world_size()

    def get_ring_rank(self) -> int:
        from omni_runtime.parallel import state

        return state.get_ring_parallel_rank()
