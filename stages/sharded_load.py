"""Loading a model straight into its HSDP shards: no rank ever holds the full weights.

The model is built with its parameters on the meta device (:func:`init_params_on_meta`; buffers stay real, so
non-persistent ones such as CLIP's ``position_ids`` keep their values), sharded with
:func:`parallel.hsdp.apply_hsdp_to_model` while still on meta, then :func:`load_sharded_weights` allocates only
this rank's shards and reads into each exactly its rows of the tensor, ``safe_open(...).get_slice(key)[start:stop]``
(the file is memory-mapped; the pages of other ranks' rows are never touched). Peak memory at load is this rank's
shards plus the one slice being copied, instead of the whole model per rank.

Checkpoint problems (missing / unexpected keys, shape mismatches, unreadable files) raise ``CheckpointError``
naming the file and keys, as :mod:`stages.weights` does for the unsharded path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from omni_runtime.parallel.hsdp import HSDPInferenceConfig, apply_hsdp_to_model
from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.weights import check_state_dict, safetensors_files

logger = logging.getLogger(__name__)


@contextmanager
def init_params_on_meta() -> Iterator[None]:
    """Construct modules with every parameter on the meta device and buffers where they normally go.

    Each parameter is moved to meta as it is registered, before any initialisation runs on it, so the
    (possibly large) ``torch.empty`` it came from is never written and no random init costs time."""
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            kwargs = dict(p.__dict__)
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)
            self._parameters[name].__dict__.update(kwargs)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@dataclass
class ShardedLoadStats:
    """What one rank read: tensors, bytes read from the files, and the bytes of parameters it holds."""

    tensors: int = 0
    bytes_read: int = 0
    local_param_bytes: int = 0


def _row_range(t: DTensor, rows: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the global tensor this rank's local shard holds (FSDP2 splits dim 0 like
    ``torch.chunk``: ``ceil(rows / n)`` per rank, the last ones shorter or empty)."""
    start, stop = 0, rows
    coord = t.device_mesh.get_coordinate()
    if coord is None:
        raise RuntimeError("this rank is not part of the parameter's device mesh")
    for dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, Shard) or placement.dim != 0:
            raise NotImplementedError(f"sharded load supports Shard(0)/Replicate placements, not {placement}")
        n = t.device_mesh.size(dim)
        span = stop - start
        chunk = math.ceil(span / n) if span else 0
        start, stop = min(start + coord[dim] * chunk, stop), min(start + (coord[dim] + 1) * chunk, stop)
    return start, stop


def _headers(files: dict[Path, list[str] | None], stack: ExitStack) -> dict[str, tuple[Any, Path]]:
    """key -> (open safetensors handle, file) for every key of every file, checking the index lists."""
    where: dict[str, tuple[Any, Path]] = {}
    for path, expected in files.items():
        try:
            f = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
            raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from e
        if expected is not None:
            absent = sorted(set(expected) - set(keys))
            if absent:
                raise CheckpointError(f"{path}: the index lists {len(absent)} key(s) this shard does not hold: "
                                      f"{absent[:20]}")
        for key in keys:
            if key in where:
                raise CheckpointError(f"{path}: key {key!r} is also in {where[key][1]}")
            where[key] = (f, path)
    return where


def _checkpoint_key(name: str, where: dict[str, Any], prefixes: tuple[str, ...]) -> str | None:
    for prefix in ("", *prefixes):
        if prefix + name in where:
            return prefix + name
    return None


def load_sharded_weights(model: nn.Module, component: str | Path, weights_name: str, *, device: torch.device,
                         key_prefixes: tuple[str, ...] = ()) -> ShardedLoadStats:
    """Fill ``model`` (parameters on meta, already passed through ``apply_hsdp_to_model``) from the safetensors
    of ``component``; every rank reads only the rows of its shards. Tensors are cast to the model's dtypes.

    ``key_prefixes``: alternative checkpoint prefixes for a parameter name (e.g. ``"text_model."`` for CLIP
    checkpoints written by older transformers). Tied parameters (one tensor under two names) are read once.
    Collective-free: each rank reads its own rows independently."""
    stats = ShardedLoadStats()
    files = safetensors_files(component, weights_name)
    with ExitStack() as stack:
        where = _headers(files, stack)
        # Every tensor of the model under each of its names; a tied tensor needs one of its names in the file.
        tensors: dict[int, list[str]] = {}
        objects: dict[int, torch.Tensor] = {}
        persistent = set(model.state_dict().keys())
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            if name in persistent:
                tensors.setdefault(id(t), []).append(name)
                objects[id(t)] = t
        chosen: dict[int, str] = {}
        used: set[str] = set()
        expected: dict[str, torch.Size] = {}
        for tid, names in tensors.items():
            found = [(n, k) for n in names if (k := _checkpoint_key(n, where, key_prefixes)) is not None]
            name, key = found[0] if found else (names[0], names[0])
            chosen[tid] = key
            used.update(k for _, k in found)
            expected[key] = objects[tid].shape
        shapes = {k: torch.empty(where[k][0].get_slice(k).get_shape(), device="meta") for k in where}
        unused = {k: v for k, v in shapes.items() if k not in used}
        check_state_dict(expected, {**{k: shapes[k] for k in expected if k in shapes}, **unused}, component)

        buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b.device.type != "meta"}
        model.to_empty(device=device)  # allocates this rank's shards only (FSDP2 keeps parameters sharded)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
            for tid, key in chosen.items():
                t = objects[tid]
                f, path = where[key]
                sl = f.get_slice(key)
                try:
                    if isinstance(t, DTensor):
                        local = t.to_local()
                        start, stop = _row_range(t, t.shape[0]) if t.dim() else (0, 0)
                        if local.dim() and local.shape[0] != stop - start:
                            raise RuntimeError(f"local shard has {local.shape[0]} rows, expected {stop - start}")
                        src = sl[start:stop] if local.dim() else sl[:]
                    else:
                        local, src = t, sl[:]
                except CheckpointError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"{path}: cannot read {key!r} ({type(e).__name__}: {e})") from e
                local.copy_(src.to(local.dtype) if local.is_floating_point() else src)
                stats.tensors += 1
                stats.bytes_read += src.numel() * src.element_size()
                del src
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        stats.local_param_bytes += local.numel() * local.element_size()
    logger.info("sharded load of %s: %d tensors, %.1f MB read, %.1f MB of parameters held by this rank",
                component, stats.tensors, stats.bytes_read / 2**20, stats.local_param_bytes / 2**20)
    return stats


def build_sharded_model(factory: Callable[[], nn.Module], component: str | Path, weights_name: str,
                        hsdp_config: HSDPInferenceConfig, *, device: torch.device, dtype: torch.dtype,
                        key_prefixes: tuple[str, ...] = ()) -> nn.Module:
    """``factory()`` built with parameters on meta, cast to ``dtype``, sharded with ``apply_hsdp_to_model`` and
    filled shard by shard from ``component``'s safetensors; returned in eval mode without gradients.
    Collective over the ranks of ``hsdp_config``'s mesh (the sharding step)."""
    with init_params_on_meta():
        model = factory()
    model = model.to(dtype).eval().requires_grad_(False)
    apply_hsdp_to_model(model, hsdp_config)
    load_sharded_weights(model, component, weights_name, device=device, key_prefixes=key_prefixes)
    return model
