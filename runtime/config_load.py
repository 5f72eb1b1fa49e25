"""Reading a TOML config file into a checked :class:`RuntimeConfig` (stdlib ``tomllib``): the key types, the
parallel tables, then the typed values are checked; relative paths resolve against the file's folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgspec

from omni_runtime.parallel.parallel_spec import ParallelSpecError
from omni_runtime.runtime.config import ConfigError, RuntimeConfig
from omni_runtime.runtime.config_parallel import check_parallel
from omni_runtime.runtime.config_schema import check_types
from omni_runtime.runtime.config_values import check_values

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def config_from_dict(raw: dict[str, Any], base_dir: Path | None = None, source: str = "") -> RuntimeConfig:
    """Check ``raw`` (a parsed TOML document) and build the config; relative paths resolve against ``base_dir``."""
    check_types(raw)
    check_parallel(raw)
    raw = {**raw, "stages": {k: dict(v) for k, v in raw.get("stages", {}).items()}}
    for st in raw["stages"].values():
        if "devices" in st:  # an index N (or "N") names CUDA device N
            st["devices"] = [f"cuda:{d}" if str(d).isdigit() else d for d in st["devices"]]
    try:
        cfg = msgspec.convert(raw, RuntimeConfig, strict=False)
    except (msgspec.ValidationError, ParallelSpecError) as e:  # the walks above should catch everything
        raise ConfigError(f"invalid config: {e}") from None
    check_values(cfg)
    path = Path(cfg.model.path).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = (base_dir / path).resolve()
    cfg.model.path = str(path)
    cfg.lora.adapters = {k: _resolve(v, base_dir) for k, v in cfg.lora.adapters.items()}
    cfg.lora.allowed_roots = [_resolve(v, base_dir) for v in cfg.lora.allowed_roots]
    cfg.source = source
    return cfg


def _resolve(path: str, base_dir: Path | None) -> str:
    p = Path(path).expanduser()
    return str((base_dir / p).resolve() if not p.is_absolute() and base_dir is not None else p)


def load_config(path: str | Path) -> RuntimeConfig:
    """Read a TOML config file; raises :class:`ConfigError` for a missing, unparsable or invalid file."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r}: cannot read it ({e.strerror})") from None
    try:
        raw = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r}: not valid TOML ({e})") from None
    return config_from_dict(raw, base_dir=p.resolve().parent, source=str(p.resolve()))
