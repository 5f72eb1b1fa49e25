"""Sequence-parallel sharding: split a tensor across the SP group, gather it back, check the pairs.

Uneven lengths follow one rule everywhere: the first ranks get ``ceil(n / world)``
elements, the last rank(s) what is left (possibly fewer, possibly none). ``sp_gather``
exchanges the shard sizes first, so it is exact for uneven shards too.

Every function takes the SP ``group`` (a ``GroupCoordinator``, e.g. ``mesh.group("sp")``; code written against the
reference API passes ``parallel.state.get_sp_group()``): nothing here reads a global.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from omni_runtime.parallel.utils import pad_dim

logger = logging.getLogger(__name__)


class ShardingError(ValueError):
    """A shard or gather cannot be done as asked (names the tensor, the dim, the sizes)."""


def shard_sizes(n: int, world: int) -> list[int]:
    """Sizes of each rank's shard of ``n`` elements: ceil for the first ranks, the rest at the end."""
    if world < 1 or n < 0:
        raise ShardingError(f"shard_sizes needs n >= 0 and world >= 1; got n={n}, world={world}")
    c = -(-n // world)
    return [max(0, min(c, n - i * c)) for i in range(world)]


def shard_offset(n: int, world: int, rank: int) -> int:
    return min(n, rank * -(-n // world))


def _sp_group(group: Any) -> Any:
    if group is None:
        raise ShardingError("group is required: the SP GroupCoordinator, e.g. mesh.group('sp') (under the reference "
                            "API, parallel.state.get_sp_group())")
    return group


def _norm_dim(tensor: torch.Tensor, dim: int) -> int:
    if not -tensor.dim() <= dim < tensor.dim():
        raise ShardingError(f"dim={dim} is out of range for a tensor of shape {tuple(tensor.shape)}")
    return dim % tensor.dim()


def sp_shard(tensor: torch.Tensor, dim: int, validate: bool = True, group: Any = None) -> torch.Tensor:
    """This rank's shard of ``tensor`` along ``dim``.

    ``validate=True`` requires the size to be divisible by the SP world size; with
    ``validate=False`` the shards follow the ceil rule (last rank shorter).
    """
    group = _sp_group(group)
    world = group.world_size
    if world == 1:
        return tensor
    dim = _norm_dim(tensor, dim)
    n = tensor.shape[dim]
    if validate and n % world:
        raise ShardingError(f"sp_shard: size {n} of dim {dim} (shape {tuple(tensor.shape)}) is not divisible by "
                            f"the sequence parallel size {world}; use validate=False for uneven shards or "
                            "sp_shard_with_padding")
    sizes = shard_sizes(n, world)
    rank = group.rank_in_group
    return tensor.narrow(dim, shard_offset(n, world, rank), sizes[rank])


def sp_shard_with_padding(tensor: torch.Tensor, dim: int, pad_value: float = 0.0,
                          group: Any = None) -> tuple[torch.Tensor, int]:
    """Pad ``dim`` up to a multiple of the SP size with ``pad_value``, then shard evenly.

    Returns ``(shard, pad)``; after ``sp_gather`` remove the last ``pad`` elements of ``dim``.
    """
    group = _sp_group(group)
    world = group.world_size
    dim = _norm_dim(tensor, dim)
    n = tensor.shape[dim]
    pad = (-n) % world
    return sp_shard(pad_dim(tensor, dim, n + pad, pad_value), dim, validate=True, group=group), pad


def sp_gather(tensor: torch.Tensor, dim: int, validate: bool = True, group: Any = None) -> torch.Tensor:
    """Concatenate every rank's shard along ``dim`` (shards may have different sizes along ``dim``).

    The shapes are exchanged first; with ``validate=True`` shards that differ in any other
    dimension raise :class:`ShardingError`.
    """
    group = _sp_group(group)
    world = group.world_size
    if world == 1:
        return tensor
    dim = _norm_dim(tensor, dim)
    shape = torch.tensor([list(tensor.shape)], dtype=torch.int64)
    shapes = group.all_gather(shape, dim=0)  # a cpu tensor: it travels on the gloo group
    shapes_l = [[int(x) for x in s] for s in shapes]
    if validate:
        for r, s in enumerate(shapes_l):
            if s[:dim] + s[dim + 1:] != shapes_l[0][:dim] + shapes_l[0][dim + 1:]:
                raise ShardingError(f"sp_gather along dim {dim}: rank {r} has shard shape {tuple(s)} but rank 0 has "
                                    f"{tuple(shapes_l[0])}; only dim {dim} may differ")
    sizes = [s[dim] for s in shapes_l]
    m = max(sizes)
    full = group.all_gather(pad_dim(tensor, dim, m).contiguous(), dim=dim)
    if all(s == m for s in sizes):
        return full
    parts = [full.narrow(dim, r * m, sizes[r]) for r in range(world)]
    return torch.cat(parts, dim=dim)


@dataclass
class ShardingValidator:
    """Tracks named shards and gathers in a forward pass; ``validate`` names any shard never gathered."""

    _sharded: set[str] = field(default_factory=set)
    _gathered: set[str] = field(default_factory=set)
    _enabled: bool = False

    @contextmanager
    def track(self) -> Iterator[ShardingValidator]:
        """Enable tracking for one forward pass (state is reset on entry)."""
        self.reset()
        self._enabled = True
        try:
            yield self
        finally:
            self._enabled = False

    def record_shard(self, name: str) -> None:
        if self._enabled:
            self._sharded.add(name)

    def record_gather(self, name: str) -> None:
        if self._enabled:
            self._gathered.add(name)

    def shard(self, tensor: torch.Tensor, name: str, dim: int, validate_divisible: bool = True,
              group: Any = None) -> torch.Tensor:
        out = sp_shard(tensor, dim, validate=validate_divisible, group=group)
        self.record_shard(name)
        return out

    def gather(self, tensor: torch.Tensor, name: str, dim: int, group: Any = None) -> torch.Tensor:
        if self._enabled and name not in self._sharded:
            raise ShardingError(f"gather of {name!r}, which was never sharded; sharded so far: {sorted(self._sharded)}")
        out = sp_gather(tensor, dim, group=group)
        self.record_gather(name)
        return out

    def validate(self) -> None:
        missing = sorted(self._sharded - self._gathered)
        if missing:
            raise ShardingError(f"sharded but never gathered: {missing}; every sp_shard needs a matching sp_gather "
                                "(or a SequenceParallelOutput in the plan), or the output stays a shard")

    def reset(self) -> None:
        self._sharded.clear()
        self._gathered.clear()

