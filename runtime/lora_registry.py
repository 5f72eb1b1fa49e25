"""The LoRA adapters a server knows by name (issue 25): ``[lora] adapters`` at start, ``POST /v1/loras`` later.

The registry lives in the orchestrator (the frontend): it maps a name to its file and a version, and checks each
file once, when it is registered, against the model's transformer checkpoint (layout, module names, shapes:
``stages.lora_files.check_lora_file``, headers only), so an adapter for another model or with wrong shapes is a 400 at
load and never reaches a rank. A request's ``lora`` names are resolved here (an unknown name is a 400 naming it):
the request then carries each adapter's path and version to the denoiser, whose every rank loads it on the admit
that first names it (every rank admits the same items at the same step boundary) and keeps at most
``[lora] max_loaded`` loaded, least recently used out (``stages.lora.LoraBank``). The config's adapters get
versions 1, 2, ... in config order (``stages.lora.configured_specs``): every denoiser rank preloads those at start,
so no request waits for their files on the step loop. Re-registering a name gives a new
version, so no rank keeps using the old file's weights for new requests; a deleted name is refused to new requests
and leaves the ranks' caches by eviction.

Paths given over HTTP must lie under one of ``[lora] allowed_roots`` after resolving symlinks (else
:class:`LoraForbidden`, a 403); the config's own adapters are trusted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from omni_runtime.runtime.config import ConfigError, RuntimeConfig
from omni_runtime.runtime.requests import LORA_NAME_PATTERN, GenerationRequest, LoraRef, RequestError
from omni_runtime.stages.lora import configured_specs
from omni_runtime.stages.lora_files import check_lora_file

logger = logging.getLogger(__name__)

__all__ = ["LoraEntry", "LoraForbidden", "LoraRegistry"]


class LoraForbidden(Exception):
    """A path outside ``[lora] allowed_roots`` (HTTP 403)."""


@dataclass(frozen=True)
class LoraEntry:
    name: str
    path: str
    version: int
    layers: int
    rank: int
    bytes: int
    source: str          # "config" or "api"
    created: float

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "version": self.version, "layers": self.layers,
                "rank": self.rank, "bytes": self.bytes, "source": self.source, "created": int(self.created)}


class LoraRegistry:
    """Name -> adapter file of one server. Thread-safe (the HTTP routes check files on worker threads)."""

    def __init__(self, cfg: RuntimeConfig) -> None:
        self.model_dir = cfg.model.path
        self.roots = [Path(os.path.realpath(r)) for r in cfg.lora.allowed_roots]
        self.configured = dict(cfg.lora.adapters)
        self.entries: dict[str, LoraEntry] = {}
        self._version = 0
        self._lock = threading.Lock()

    def preload(self) -> None:
        """Register (and check) the config's adapters; a bad one is a :class:`ConfigError` naming its key."""
        for spec in configured_specs(self.configured):  # versions 1, 2, ...: the ones the ranks preload
            name, path = spec.name, spec.path
            try:
                self.add(name, path, source="config", version=spec.version)
            except ValueError as e:  # a bad file (LoraError) or name
                raise ConfigError(f"lora.adapters.{name} = {path!r}: {e}") from None

    def check_root(self, path: str) -> str:
        """``path`` resolved (symlinks too); :class:`LoraForbidden` unless it lies under an allowed root."""
        real = Path(os.path.realpath(path))
        if not self.roots:
            raise LoraForbidden("loading adapters over HTTP is off: [lora] allowed_roots is empty")
        if not any(real == r or r in real.parents for r in self.roots):
            raise LoraForbidden(f"path {path!r} is outside [lora] allowed_roots "
                                f"({', '.join(str(r) for r in self.roots)})")
        return str(real)

    def add(self, name: Any, path: Any, *, source: str = "api", version: int | None = None) -> LoraEntry:
        """Check the file and register it as ``name`` (replacing an entry of that name with a new version;
        ``version``: the config's adapters get theirs from ``stages.lora.configured_specs``, what the ranks preload;
        later ones count on above every version given so far)."""
        import re

        if not isinstance(name, str) or not re.match(LORA_NAME_PATTERN, name):
            raise RequestError(f"name={name!r}: must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', '-' (not "
                               f"starting with '.', '_', '-')", "name")
        if not isinstance(path, str) or not path:
            raise RequestError(f"path={path!r}: must be the path of a .safetensors LoRA file", "path")
        if source == "api":
            path = self.check_root(path)
        summary = check_lora_file(path, self.model_dir, name)
        with self._lock:
            self._version = max(self._version + 1, version or 0)
            entry = LoraEntry(name=name, path=str(path), version=version or self._version, source=source,
                              created=time.time(), **summary)
            self.entries[name] = entry
        logger.info("lora %r registered from %s (%d layers, rank %d)", name, path, entry.layers, entry.rank)
        return entry

    def remove(self, name: str) -> bool:
        with self._lock:
            return self.entries.pop(name, None) is not None

    def list(self) -> list[LoraEntry]:
        with self._lock:
            return sorted(self.entries.values(), key=lambda e: e.name)

    def resolve(self, req: GenerationRequest) -> GenerationRequest:
        """``req`` with each adapter's path and version filled in; :class:`RequestError` naming an unknown one."""
        if not req.lora:
            return req
        out = []
        with self._lock:
            for ref in req.lora:
                e = self.entries.get(ref.name)
                if e is None:
                    known = ", ".join(sorted(self.entries)) or "none"
                    raise RequestError(f"lora: unknown adapter {ref.name!r}; registered: {known}", "lora")
                out.append(LoraRef(name=ref.name, scale=ref.scale, path=e.path, version=e.version))
        return msgspec.structs.replace(req, lora=tuple(out))
