"""Reading diffusers-format model directories: model_index.json, component configs, (sharded) safetensors.

Every failure a user can cause (a missing component, a truncated file, a key or shape that does not fit) raises
``CheckpointError`` naming the file or key, so a wrong path or a damaged download is obvious from the message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from omni_runtime.stages.errors import CheckpointError

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # diffusers models (transformer, vae)
TRANSFORMERS_WEIGHTS = "model"  # transformers models (text encoders)
_MAX_LISTED = 20


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object from ``path``; a missing or malformed file is a ``CheckpointError`` naming it."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: file not found")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: expected a JSON object, found {type(data).__name__}")
    return data


def read_model_index(model_dir: str | Path) -> dict[str, tuple[str, str]]:
    """The components listed in ``model_dir/model_index.json``: ``{name: (library, class_name)}``.

    Entries whose library is null (optional components left out, e.g. ``image_encoder``) are skipped, and so are
    entries that are not a list (pipeline settings such as Wan's ``"boundary_ratio": null``).
    """
    index_path = Path(model_dir) / MODEL_INDEX
    index = read_json(index_path)
    components: dict[str, tuple[str, str]] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if len(value) != 2:
            raise CheckpointError(f"{index_path}: entry {name!r} = {value!r}; expected [library, class_name]")
        library, class_name = value
        if library is None or class_name is None:
            continue
        components[name] = (str(library), str(class_name))
    return components


def component_dir(model_dir: str | Path, name: str) -> Path:
    """``model_dir/name``, checked to be listed in model_index.json and to exist on disk."""
    root = Path(model_dir)
    components = read_model_index(root)
    if name not in components:
        raise CheckpointError(
            f"{root / MODEL_INDEX}: component {name!r} is not listed; listed: {sorted(components)}")
    path = root / name
    if not path.is_dir():
        raise CheckpointError(f"{path}: component directory {name!r} is missing (listed in {MODEL_INDEX})")
    return path


def read_config(component: str | Path, filename: str = "config.json",
                allowed_classes: Iterable[str] | None = None) -> dict[str, Any]:
    """Read a component's config; if ``allowed_classes`` is given its ``_class_name`` must be one of them."""
    path = Path(component) / filename
    config = read_json(path)
    if allowed_classes is not None:
        allowed = sorted(allowed_classes)
        found = config.get("_class_name")
        if found not in allowed:
            raise CheckpointError(f"{path}: _class_name={found!r} is not supported; allowed: {allowed}")
    return config


def safetensors_files(component: str | Path, weights_name: str = DIFFUSERS_WEIGHTS) -> dict[Path, list[str] | None]:
    """The weight files of a component: ``{file: expected keys or None}``.

    A single ``<weights_name>.safetensors`` maps to None (all its keys); a sharded checkpoint is read through
    ``<weights_name>.safetensors.index.json`` whose ``weight_map`` says which keys each shard holds.
    """
    comp = Path(component)
    single = comp / f"{weights_name}.safetensors"
    index_path = comp / f"{weights_name}.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
        files: dict[Path, list[str] | None] = {}
        for key, shard in weight_map.items():
            files.setdefault(comp / str(shard), []).append(key)  # type: ignore[union-attr]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index_path}: shard file(s) not found: {missing}")
        return files
    if single.is_file():
        return {single: None}
    present = sorted(p.name for p in comp.glob("*.safetensors*")) if comp.is_dir() else []
    raise CheckpointError(
        f"{comp}: no weights found; expected {single.name} or {index_path.name}"
        + (f" (found {present})" if present else ""))


# Bytes per element of each safetensors dtype (the format's spec); a header naming another dtype is corrupt.
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2,
                           "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
                           "F64": 8, "C64": 8}
MAX_SAFETENSORS_HEADER = 100 << 20  # the reference implementation's limit


def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file, checked against the file's size, reading the header only.

    Returns ``{name: {"dtype", "shape", "data_offsets"}}``; a truncated file, a header that is not JSON, an unknown
    dtype, or offsets that do not fit the shape or the file are a ``CheckpointError`` naming the file.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > MAX_SAFETENSORS_HEADER or 8 + n > size:
                raise CheckpointError(f"{p}: not a safetensors file (header length {n} does not fit a file of "
                                      f"{size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read it ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{p}: corrupted safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: corrupted safetensors header (a JSON {type(header).__name__}, not an object)")
    data_size = size - 8 - n
    tensors: dict[str, dict[str, Any]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise CheckpointError(f"{p}: corrupted safetensors header (entry {name!r} is not an object)")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            raise CheckpointError(f"{p}: corrupted safetensors header (tensor {name!r}: unknown dtype {dtype!r})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise CheckpointError(f"{p}: corrupted safetensors header (tensor {name!r}: shape {shape!r}, "
                                  f"data_offsets {offsets!r})")
        numel = 1
        for d in shape:
            numel *= d
        begin, end = offsets
        if end - begin != numel * SAFETENSORS_DTYPE_BYTES[dtype] or end > data_size:
            raise CheckpointError(f"{p}: corrupted or truncated safetensors file (tensor {name!r}: bytes "
                                  f"{begin}..{end} for {dtype} {shape}, the file holds {data_size} data bytes)")
        tensors[name] = entry
    return tensors


def load_safetensors(component: str | Path, weights_name: str = DIFFUSERS_WEIGHTS, *,
                     device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     skip: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, cast to ``dtype`` (floating tensors only).

    Keys for which ``skip(key)`` is true are not read (e.g. the experts another expert-parallel rank holds)."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path, expected in safetensors_files(component, weights_name).items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                if expected is not None:
                    absent = sorted(set(expected) - set(keys))
                    if absent:
                        raise CheckpointError(
                            f"{path}: the index lists {len(absent)} key(s) this shard does not hold: "
                            f"{_listing(absent)}")
                for key in keys:
                    if key in origin:
                        raise CheckpointError(f"{path}: key {key!r} is also in {origin[key]}")
                    if skip is not None and skip(key):
                        continue
                    t = f.get_tensor(key)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    state[key] = t.to(device)
                    origin[key] = path
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
            raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from e
    return state


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def check_state_dict(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise ``CheckpointError`` listing missing keys, unexpected keys and shape mismatches, if any."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}" for k in mismatched]
        problems.append(f"shape mismatches ({len(mismatched)}): {_listing(shapes)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not fit the model; " + "; ".join(problems))


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Strictly load ``state`` into ``module`` (which may live on the meta device: tensors are assigned)."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state, source)
    module.load_state_dict(state, strict=True, assign=True)
