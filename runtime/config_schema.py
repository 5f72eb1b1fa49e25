"""The keys a config file may have and the type of each: the walk that turns an unknown key or a value of the
wrong type into a :class:`ConfigError` naming the key path and what is allowed there."""

from __future__ import annotations

import math
import re
from typing import Any

from omni_runtime.runtime.config import RAY_RESERVED_RESOURCES, ConfigError
from omni_runtime.runtime.config_parallel import (
    DENOISER_PARALLEL_CHOICES,
    DENOISER_PARALLEL_COUNTS,
    DENOISER_PARALLEL_FLAGS,
    DENOISER_PARALLEL_KEYS,
    TEXT_ENCODER_PARALLEL_KEYS,
    VAE_PARALLEL_KEYS,
)

# --- the schema the checker walks: key -> (kind, allowed text) or a nested schema ---------------------------

_INT, _FLOAT, _STR, _DEVICES, _BOOL, _RESOURCES = "int", "float", "str", "devices", "bool", "resources"
_STRS, _STR_TABLE = "strs", "str_table"  # a list of strings; a table of names -> strings
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|\d+)$")

_STAGE_KEYS: dict[str, Any] = {"replicas": _INT, "max_batch_size": _INT, "batch_timeout_ms": _FLOAT,
                               "devices": _DEVICES, "threads": _INT, "ray_strategy": _STR,
                               "ray_resources": _RESOURCES}
_PIXEL_STAGE_KEYS: dict[str, Any] = {**_STAGE_KEYS, "max_batch_pixels": _INT}
_SCHEMA: dict[str, Any] = {
    "model": {"path": _STR, "dtype": _STR, "device": _STR},
    "server": {"host": _STR, "port": _INT, "api_key": _STR, "max_queue": _INT, "request_timeout_s": _FLOAT,
               "max_pixels_steps": _INT, "metrics_require_key": _BOOL, "keep_alive_timeout_s": _FLOAT,
               "header_timeout_s": _FLOAT, "body_timeout_s": _FLOAT, "max_connections": _INT,
               "stall_timeout_s": _FLOAT, "max_edit_images": _INT, "max_edit_image_bytes": _INT,
               "max_edit_image_pixels": _INT},
    "stages": {
        "text_encoder": {**_STAGE_KEYS, "parallel": dict.fromkeys(TEXT_ENCODER_PARALLEL_KEYS, _INT)},
        "denoiser": {**_PIXEL_STAGE_KEYS, "scheduling": _STR, "batch_invariant": _BOOL,
                     "priority_aging_s": _FLOAT, "mixed_sizes": _BOOL, "cpu_linear": _STR,
                     "max_padding_waste": _FLOAT, "compile": _BOOL, "compile_warmup": _STRS,
                     "cache": {"method": _STR, "threshold": _FLOAT, "fn": _INT, "bn": _INT, "warmup_steps": _INT,
                               "max_cached_steps": _INT},
                     "parallel": {**dict.fromkeys(DENOISER_PARALLEL_KEYS, _INT),
                                                        **dict.fromkeys(DENOISER_PARALLEL_CHOICES, _STR),
                                                        **dict.fromkeys(DENOISER_PARALLEL_COUNTS, _INT),
                                                        **dict.fromkeys(DENOISER_PARALLEL_FLAGS, _BOOL)}},
        "vae": {**_PIXEL_STAGE_KEYS, "tiling": _BOOL, "parallel": dict.fromkeys(VAE_PARALLEL_KEYS, _INT)},
    },
    "placement": {"tensor_transport": _STR, "launcher": _STR, "ray_address": _STR, "cpu_sharing": _STR},
    "lora": {"adapters": _STR_TABLE, "max_loaded": _INT, "allowed_roots": _STRS},
    "video": {"max_frames": _INT, "max_work": _INT, "max_jobs": _INT, "job_ttl_s": _FLOAT, "fps": _INT,
              "previews": _INT},
}
_REQUIRED = {("model",): ["path"], (): ["model"]}


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_types(raw: dict[str, Any]) -> None:
    """Every key of ``raw`` (a parsed TOML document) is in the schema and its value has the key's type."""
    _check_types(raw, _SCHEMA, ())


def _check_types(raw: dict[str, Any], schema: dict[str, Any], prefix: tuple[str, ...]) -> None:
    for key in _REQUIRED.get(prefix, []):
        if key not in raw:
            where = ".".join(prefix) or "the top level"
            raise ConfigError(f"{'.'.join(prefix + (key,))}: missing; {where} requires the key {key!r}")
    for key, value in raw.items():
        path = ".".join(prefix + (key,))
        if key not in schema:
            allowed = ", ".join(sorted(schema))
            raise ConfigError(f"{path}: unknown key (value {value!r}); allowed keys here: {allowed}")
        kind = schema[key]
        if kind == _RESOURCES:  # a table of free-form names: checked here, not walked as a schema
            _check_resources(path, value)
        elif kind == _STR_TABLE:
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ConfigError(f"{path} = {_describe(value)}: must be a table of names to file paths, e.g. "
                                  f'{{style = "loras/style.safetensors"}}')
        elif kind == _STRS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path} = {_describe(value)}: must be a list of strings")
        elif isinstance(kind, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} = {_describe(value)}: must be a table [{path}]")
            _check_types(value, kind, prefix + (key,))
        elif kind == _INT:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{path} = {_describe(value)}: must be an integer")
        elif kind == _FLOAT:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{path} = {_describe(value)}: must be a finite number")
        elif kind == _BOOL:
            if not isinstance(value, bool):
                raise ConfigError(f"{path} = {_describe(value)}: must be true or false")
        elif kind == _STR:
            if not isinstance(value, str):
                raise ConfigError(f"{path} = {_describe(value)}: must be a string")
        elif kind == _DEVICES:
            if not isinstance(value, list) or not all(
                    isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool)) for d in value):
                raise ConfigError(f"{path} = {_describe(value)}: must be a list of device names or indices, "
                                  f'e.g. ["cuda:0", "cuda:1"] or [0, 1]')
            for i, d in enumerate(value):
                if not (isinstance(d, int) and d >= 0) and not (isinstance(d, str) and _DEVICE.match(d)):
                    raise ConfigError(f"{path}[{i}] = {_describe(d)}: allowed: 'cpu', 'cuda', 'cuda:N' or a "
                                      f"CUDA device index N >= 0")


def _check_resources(path: str, value: Any) -> None:
    """``stages.<name>.ray_resources``: Ray resource names -> amounts per rank (finite numbers > 0)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{path} = {_describe(value)}: must be a table of Ray resource names to amounts, "
                          f'e.g. {{"big_node" = 1}}')
    for name, amount in value.items():
        if not name or name in RAY_RESERVED_RESOURCES:
            raise ConfigError(f"{path}.{name} = {amount!r}: not allowed here; a rank's CPUs are its threads "
                              f"(stages.<name>.threads) and its GPU comes from model.device; allowed: custom "
                              f"resource names other than {', '.join(RAY_RESERVED_RESOURCES)}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) \
                or amount <= 0:
            raise ConfigError(f"{path}.{name} = {_describe(amount)}: must be a finite number > 0 (the amount of "
                              f"the resource each rank of the stage takes)")
