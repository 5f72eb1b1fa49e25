"""Loading a model straight into its HSDP shards: no rank ever holds the full weights.

The model is built with its parameters on the meta device (:func:`init_params_on_meta`; buffers stay real, so
non-persistent ones such as CLIP's ``position_ids`` keep their values), sharded with
:func:`parallel.hsdp.apply_hsdp_to_model` while still on meta, then :func:`load_sharded_weights` allocates only
this rank's shards and reads into each exactly its rows of the tensor. A row range of a C-ordered tensor is one
contiguous byte range of the safetensors file, so it is read with one plain ``readinto`` straight into the shard's
memory (through one temporary of the rows when the dtype or device differs). No mmap: neither the other ranks'
rows nor the file's pages ever count towards this process's memory. Peak memory at load is this rank's shards
(plus one tensor's rows when casting), instead of the whole model per rank.

Checkpoint problems (missing / unexpected keys, shape mismatches, unreadable files) raise ``CheckpointError``
naming the file and keys, as :mod:`stages.weights` does for the unsharded path.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
            # parallel/hsdp.py shards every parameter with fully_shard's default Shard(0) (replicated across
            # hsdp_replicate): no config reaches another placement; one here is a bug of ours, said as such
            raise RuntimeError(f"internal error: HSDP placed a parameter as {placement}; the sharded load reads "
                               f"rows of Shard(0) / Replicate placements only")
        n = t.device_mesh.size(dim)
        span = stop - start
        chunk = math.ceil(span / n) if span else 0
        start, stop = min(start + coord[dim] * chunk, stop), min(start + (coord[dim] + 1) * chunk, stop)
    return start, stop


_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are in a safetensors file (C order, little endian)."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in the file

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize if self.shape else self.dtype.itemsize


def read_safetensors_index(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header: every tensor's dtype, shape and byte offset, checked against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            n = int.from_bytes(raw, "little")
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: header length {n} does not fit a file of {size} bytes")
            header = json.loads(fh.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    base = 8 + n
    entries: dict[str, TensorEntry] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry {info!r} "
                                  f"(dtype one of {sorted(_DTYPES)}, shape, data_offsets)") from e
        nbytes = math.prod(shape) * dtype.itemsize
        if any(d < 0 for d in shape) or end - begin != nbytes or begin < 0 or base + end > size:
            raise CheckpointError(f"{path}: tensor {key!r} ({info['dtype']} {list(shape)}) claims bytes "
                                  f"[{begin}, {end}) but needs {nbytes} inside the file's {size - base} data bytes")
        entries[key] = TensorEntry(path, dtype, shape, base + begin)
    return entries


def _headers(files: dict[Path, list[str] | None]) -> dict[str, TensorEntry]:
    """key -> its entry for every key of every file, checking the index lists."""
    where: dict[str, TensorEntry] = {}
    for path, expected in files.items():
        entries = read_safetensors_index(path)
        if expected is not None:
            absent = sorted(set(expected) - set(entries))
            if absent:
                raise CheckpointError(f"{path}: the index lists {len(absent)} key(s) this shard does not hold: "
                                      f"{absent[:20]}")
        for key, entry in entries.items():
            if key in where:
                raise CheckpointError(f"{path}: key {key!r} is also in {where[key].path}")
            where[key] = entry
    return where


def _read_rows(fh: Any, entry: TensorEntry, start: int, stop: int, into: torch.Tensor) -> int:
    """Copy rows ``[start, stop)`` of ``entry`` into ``into`` (its shape); reads straight into ``into``'s memory
    when it is a contiguous CPU tensor of the file's dtype, else through one temporary of the rows.
    Returns the bytes read."""
    nbytes = (stop - start) * entry.row_bytes
    if nbytes == 0:
        return 0
    fh.seek(entry.offset + start * entry.row_bytes)
    direct = into.device.type == "cpu" and into.dtype == entry.dtype and into.is_contiguous()
    buf = into if direct else torch.empty(into.shape, dtype=entry.dtype)
    view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
    got = fh.readinto(view)
    if got != nbytes:
        raise CheckpointError(f"{entry.path}: truncated: read {got} of {nbytes} bytes")
    if not direct:
        into.copy_(buf)
    return nbytes


def _checkpoint_key(name: str, where: dict[str, Any], prefixes: tuple[str, ...],
                    renames: tuple[tuple[str, str], ...] = ()) -> str | None:
    for prefix in ("", *prefixes):
        if prefix + name in where:
            return prefix + name
    for module_prefix, checkpoint_prefix in renames:
        if name.startswith(module_prefix) and checkpoint_prefix + name[len(module_prefix):] in where:
            return checkpoint_prefix + name[len(module_prefix):]
    return None


def load_sharded_weights(model: nn.Module, component: str | Path, weights_name: str, *, device: torch.device,
                         key_prefixes: tuple[str, ...] = (),
                         key_renames: tuple[tuple[str, str], ...] = ()) -> ShardedLoadStats:
    """Fill ``model`` (parameters on meta, already passed through ``apply_hsdp_to_model``) from the safetensors
    of ``component``; every rank reads only the rows of its shards. Tensors are cast to the model's dtypes.

    ``key_prefixes``: alternative checkpoint prefixes for a parameter name (e.g. ``"text_model."`` for CLIP
    checkpoints written by older transformers). ``key_renames``: ``(module prefix, checkpoint prefix)`` pairs for
    checkpoints that store a module's parameters under another path (transformers 5 saves Qwen2.5-VL's
    ``model.language_model.*`` as ``model.*``). A parameter's own name is tried first. Tied parameters (one
    tensor under two names) are read once. Collective-free: each rank reads its own rows independently (plain
    reads, no mmap: the file's pages never count towards this process's memory)."""
    stats = ShardedLoadStats()
    where = _headers(safetensors_files(component, weights_name))
    # Every tensor of the model under each of its names; a tied tensor needs one of its names in the file.
    tensors: dict[int, list[str]] = {}
    objects: dict[int, torch.Tensor] = {}
    persistent = set(model.state_dict().keys())
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name in persistent:
            tensors.setdefault(id(t), []).append(name)
            objects[id(t)] = t
    chosen: dict[str, str] = {}  # one module name of each tensor -> its checkpoint key
    used: set[str] = set()
    expected: dict[str, torch.Size] = {}
    for tid, names in tensors.items():
        found = [(n, k) for n in names if (k := _checkpoint_key(n, where, key_prefixes, key_renames)) is not None]
        _, key = found[0] if found else (names[0], names[0])
        chosen[names[0]] = key
        used.update(k for _, k in found)
        expected[key] = objects[tid].shape
    shapes = {k: torch.empty(e.shape, device="meta") for k, e in where.items()}
    check_state_dict(expected, {k: v for k, v in shapes.items() if k in expected or k not in used}, component)

    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    model.to_empty(device=device)  # allocates this rank's shards only (FSDP2 keeps parameters sharded)
    # to_empty may replace tensors (it does for modules FSDP2 does not manage): look them up again by name
    live = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    handles: dict[Path, Any] = {}
    try:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
            for name, key in chosen.items():
                t, entry = live[name], where[key]
                fh = handles.get(entry.path)
                if fh is None:
                    fh = handles[entry.path] = open(entry.path, "rb")  # noqa: SIM115 (closed below)
                if isinstance(t, DTensor) and t.dim():
                    local = t.to_local()
                    start, stop = _row_range(t, t.shape[0])
                    if local.shape[0] != stop - start:
                        raise RuntimeError(f"{key}: local shard has {local.shape[0]} rows, expected {stop - start}")
                else:
                    local = t.to_local() if isinstance(t, DTensor) else t
                    start, stop = 0, (t.shape[0] if t.dim() else 1)
                stats.bytes_read += _read_rows(fh, entry, start, stop, local)
                stats.tensors += 1
    except OSError as e:
        raise CheckpointError(f"{component}: cannot read weights ({e})") from e
    finally:
        for fh in handles.values():
            fh.close()
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        stats.local_param_bytes += local.numel() * local.element_size()
    logger.info("sharded load of %s: %d tensors, %.1f MB read, %.1f MB of parameters held by this rank",
                component, stats.tensors, stats.bytes_read / 2**20, stats.local_param_bytes / 2**20)
    return stats


def build_sharded_model(factory: Callable[[], nn.Module], component: str | Path, weights_name: str,
                        hsdp_config: HSDPInferenceConfig, *, device: torch.device, dtype: torch.dtype,
                        key_prefixes: tuple[str, ...] = (),
                        key_renames: tuple[tuple[str, str], ...] = ()) -> nn.Module:
    """``factory()`` built with parameters on meta, cast to ``dtype``, sharded with ``apply_hsdp_to_model`` and
    filled shard by shard from ``component``'s safetensors; returned in eval mode without gradients.
    Collective over the ranks of ``hsdp_config``'s mesh (the sharding step)."""
    with init_params_on_meta():
        model = factory()
    model = model.to(dtype).eval().requires_grad_(False)
    apply_hsdp_to_model(model, hsdp_config)
    load_sharded_weights(model, component, weights_name, device=device, key_prefixes=key_prefixes,
                         key_renames=key_renames)
    return model
