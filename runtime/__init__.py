"""Control plane: config, CLI, process launch and placement, orchestrator, HTTP server, offline API.

``from omni_runtime.runtime import Omni`` is the Python API (imported lazily: ``import runtime`` stays light for the CLI).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Omni"]


def __getattr__(name: str) -> Any:
    if name == "Omni":
        from omni_runtime.runtime.omni import Omni

        return Omni
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
