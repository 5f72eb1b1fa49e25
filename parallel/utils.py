"""Small arithmetic helpers for splitting work across ranks.

``divide`` / ``ensure_divisibility`` guard integer splits, ``split_tensor_along_last_dim``
cuts a tensor into equal chunks, ``pad_dim`` pads one dim up to a length (uneven shards),
``cat_views`` joins slices without a copy when they are neighbours in one tensor,
and ``get_pp_indices`` assigns transformer layers to pipeline stages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)


def ensure_divisibility(numerator: int, denominator: int) -> None:
    """Raise ``ValueError`` unless ``denominator`` divides ``numerator``."""
    if denominator <= 0 or numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by {denominator}")


def divide(numerator: int, denominator: int) -> int:
    """Exact integer division: ``numerator // denominator`` after checking divisibility."""
    ensure_divisibility(numerator, denominator)
    return numerator // denominator


def split_tensor_along_last_dim(
    tensor: torch.Tensor, num_partitions: int, contiguous_split_chunks: bool = False
) -> Sequence[torch.Tensor]:
    """Split ``tensor`` into ``num_partitions`` equal chunks along its last dimension.

    The chunks are views unless ``contiguous_split_chunks`` is true.
    """
    last_dim_size = divide(tensor.shape[-1], num_partitions)
    chunks = torch.split(tensor, last_dim_size, dim=-1)
    if contiguous_split_chunks:
        return tuple(chunk.contiguous() for chunk in chunks)
    return chunks


def pad_dim(tensor: torch.Tensor, dim: int, length: int, value: float | bool = 0) -> torch.Tensor:
    """``tensor`` extended along ``dim`` to ``length`` with ``value`` (the tensor itself when long enough)."""
    if tensor.shape[dim] >= length:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = length - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_full(shape, value)], dim=dim)


def cat_views(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(tensors, dim)``, but a view without a copy when the parts are neighbouring slices of one tensor
    along ``dim`` (e.g. ``[x[:, :t], x[:, t:]]``): the model splits text and image tokens for sequence parallelism
    and joins them again, which without sharding would copy the same bytes back into place. The result may share
    memory with the inputs: read it, do not write into it. Under ``torch.compile`` a plain ``torch.cat`` (the
    compiler plans the buffers itself; storage pointers cannot be traced)."""
    if torch.compiler.is_compiling():
        return torch.cat(list(tensors), dim=dim)
    parts = [t for t in tensors if t.shape[dim] != 0] or list(tensors[:1])
    if not parts:
        raise ValueError("cat_views needs at least one tensor")
    first = parts[0]
    d = dim % first.dim()
    total = first.shape[d]
    for prev, t in zip(parts, parts[1:], strict=False):
        if (t.dtype != first.dtype or t.device != first.device or t.dim() != first.dim()
                or t.stride() != first.stride()
                or any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape, strict=True)) if i != d)
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != prev.storage_offset() + prev.shape[d] * prev.stride(d)):
            return torch.cat(list(tensors), dim=dim)
        total += t.shape[d]
    if len(parts) == 1:
        return first
    shape = list(first.shape)
    shape[d] = total
    return first.as_strided(shape, first.stride(), first.storage_offset())


def balanced_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """``n`` items in ``parts`` contiguous ``[start, end)`` ranges, sizes differing by at most one, the earlier
    ranges taking the extra items; with fewer items than parts the trailing ranges are empty."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for k in range(parts):
        size = base + (1 if k < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def get_pp_indices(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Return ``(start, end)``: the half-open range of layers that pipeline stage ``pp_rank`` owns.

    Layers are split as evenly as possible. The ``r = num_layers % pp_size`` remaining layers go
    one each to the partitions just before the last one, walking backwards: the last partition is
    never given an extra layer (it usually also holds the final norm / output projection). When
    ``pp_size > 2`` and ``0 < r <= pp_size - 2`` this means only middle partitions receive extras,
    so the first partition (input embedding) and the last (output head) stay lightest.

    Examples: 10 layers over 4 stages -> [2, 3, 3, 2]; 11 over 4 -> [3, 3, 3, 2]; 5 over 2 -> [3, 2].
    """
    if pp_size < 1:
        raise ValueError(f"pipeline_parallel_size must be >= 1, got {pp_size}")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank must be in [0, {pp_size}), got {pp_rank}")
    if num_layers < pp_size:
        raise ValueError(
            f"num_layers {num_layers} is smaller than pipeline_parallel_size {pp_size}: "
            "every pipeline stage needs at least one layer"
        )
    partitions = [num_layers // pp_size] * pp_size
    remaining = num_layers % pp_size
    for i in range(2, remaining + 2):
        partitions[-i] += 1
    start = sum(partitions[:pp_rank])
    return start, start + partitions[pp_rank]
