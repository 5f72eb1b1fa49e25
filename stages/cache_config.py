"""A request's cache acceleration settings (``cache: {"method": ..., ...}``) and counters; no torch here, so the API
edge (``runtime.requests``, ``runtime.config``) validates with the same table the denoiser runs
(``stages.block_cache``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CACHE_FIELDS", "METHODS", "CacheConfig", "CacheStats", "allowed_text", "parse_cache"]

#: the methods; "none" switches a configured default off for one request
METHODS = ("first_block", "dbcache", "teacache", "none")
MAX_THRESHOLD = 1.0
MAX_TEACACHE_THRESHOLD = 2.0  # TeaCache's accumulated rescaled distance (its authors use 0.25 to 0.8 on FLUX.1)
MAX_BLOCKS = 1000
MAX_STEPS = 1000
#: the keys of a cache object, by method, with (minimum, maximum) or None for method
CACHE_FIELDS: dict[str, dict[str, tuple[float, float] | None]] = {
    "first_block": {"method": None, "threshold": (0.0, MAX_THRESHOLD)},
    "dbcache": {"method": None, "threshold": (0.0, MAX_THRESHOLD), "fn": (1, MAX_BLOCKS), "bn": (0, MAX_BLOCKS),
                "warmup_steps": (0, MAX_STEPS), "max_cached_steps": (0, MAX_STEPS)},
    "teacache": {"method": None, "threshold": (0.0, MAX_TEACACHE_THRESHOLD)},
    "none": {"method": None},
}


@dataclass(frozen=True)
class CacheConfig:
    """One request's cache: ``method`` and its parameters (validated by :func:`parse_cache`)."""

    method: str = "first_block"
    threshold: float = 0.05
    fn: int = 1
    bn: int = 0
    warmup_steps: int = 0
    max_cached_steps: int = 0

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in CACHE_FIELDS[self.method]}


def parse_cache(raw: Any, where: str = "cache") -> CacheConfig:
    """A cache object (``{"method": ..., "threshold": ..., ...}``) -> :class:`CacheConfig`; a bad one raises
    ``ValueError`` naming the key and what is allowed (the edge wraps it in its own error type)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be an object {{\"method\": one of {', '.join(METHODS)}, ...}}")
    method = raw.get("method")
    if method not in CACHE_FIELDS:
        raise ValueError(f"{where}.method={method!r}: allowed values are {', '.join(METHODS)}")
    allowed = CACHE_FIELDS[method]
    unknown = sorted(k for k in raw if k not in allowed)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: not a key of method {method!r}; allowed: {', '.join(allowed)}")
    values: dict[str, Any] = {"method": method}
    for key, bounds in allowed.items():
        if bounds is None or key not in raw:
            continue
        lo, hi = bounds
        v = raw[key]
        integer = isinstance(lo, int)
        if integer and isinstance(v, float) and v.is_integer():
            v = int(v)
        ok_type = (isinstance(v, int) if integer else isinstance(v, (int, float))) and not isinstance(v, bool)
        if not ok_type or (not integer and not math.isfinite(v)) or not lo <= v <= hi:
            kind = "an integer" if integer else "a number"
            raise ValueError(f"{where}.{key}={v!r}: must be {kind} from {lo:g} to {hi:g}")
        values[key] = v if integer else float(v)
    return CacheConfig(**values)


@dataclass
class CacheStats:
    """What one request's rows did: forwards (row-steps) and blocks, computed and cached."""

    method: str
    steps: int = 0
    cached_steps: int = 0
    blocks: int = 0
    cached_blocks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "steps": self.steps, "cached_steps": self.cached_steps,
                "blocks": self.blocks, "cached_blocks": self.cached_blocks}


def allowed_text() -> str:
    """What a cache object may hold, in words (CLI help, docs, errors)."""
    parts = []
    for method, keys in CACHE_FIELDS.items():
        ranges = ", ".join(f"{k} {lo:g}..{hi:g}" for k, b in keys.items() if b is not None for lo, hi in [b])
        parts.append(f"{method!r}" + (f" ({ranges})" if ranges else ""))
    return "{\"method\": " + " | ".join(parts) + "}"
