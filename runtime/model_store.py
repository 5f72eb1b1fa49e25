"""Create the embedded tiny model on first use.

A config whose ``model.path`` does not exist and whose directory name is one of :data:`GENERATED_NAMES`
(``tiny-flux``, ``small-flux``, ``tiny-qwen-image``, ``small-qwen-image``, ``tiny-flux-kontext``,
``small-flux-kontext``, ``tiny-wan``, ``small-wan``, ``tiny-wan22``, ``tiny-qwen-image-edit``,
``tiny-qwen-image-edit-plus`` and their ``small-`` presets: a family's embedded preset, random
weights) gets that model written there by the family's ``make_tiny``, once: the writer
holds a lock file and builds into a temporary sibling directory that is renamed into place, so concurrent
first uses never see a half-written model. Any other missing path is an error naming ``model.path``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

from omni_runtime.runtime.config import ConfigError

logger = logging.getLogger(__name__)

#: directory name -> (pipeline class, preset) of the embedded models made on first use
GENERATED_NAMES: dict[str, tuple[str, str]] = {
    "tiny-flux": ("FluxPipeline", "tiny"), "small-flux": ("FluxPipeline", "small"),
    "tiny-qwen-image": ("QwenImagePipeline", "tiny"), "small-qwen-image": ("QwenImagePipeline", "small"),
    "tiny-flux-kontext": ("FluxKontextPipeline", "tiny"), "small-flux-kontext": ("FluxKontextPipeline", "small"),
    "tiny-wan": ("WanPipeline", "tiny"), "small-wan": ("WanPipeline", "small"),
    "tiny-wan22": ("WanPipeline", "tiny22"),  # Wan 2.2's two experts (transformer_2, boundary_ratio)
    "tiny-qwen-image-edit": ("QwenImageEditPipeline", "tiny"),
    "small-qwen-image-edit": ("QwenImageEditPipeline", "small"),
    "tiny-qwen-image-edit-plus": ("QwenImageEditPlusPipeline", "tiny"),
    "small-qwen-image-edit-plus": ("QwenImageEditPlusPipeline", "small"),
}


def model_status(path: str) -> str:
    """What ``omni-runtime check`` says about ``model.path``; raises :class:`ConfigError` if it cannot work."""
    p = Path(path)
    if (p / "model_index.json").exists():
        return "present"
    if p.name in GENERATED_NAMES:
        pipeline, preset = GENERATED_NAMES[p.name]
        return f"missing: the embedded {preset} {pipeline} model is created there on first use"
    raise ConfigError(f"model.path = {path!r}: no diffusers model there (model_index.json missing); "
                      f"allowed: a diffusers-format directory, or a path ending in "
                      f"{' / '.join(sorted(GENERATED_NAMES))} to have the embedded model created")


def ensure_model(path: str) -> Path:
    """Return ``path`` as a model directory, creating the embedded tiny model there if it is one and missing."""
    p = Path(path)
    if (p / "model_index.json").exists():
        return p
    model_status(path)  # raises for a missing path we cannot create
    pipeline, preset = GENERATED_NAMES[p.name]
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p.parent / f".{p.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (p / "model_index.json").exists():
            return p
        tmp = p.parent / f".{p.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info("creating the embedded %s %s model at %s (first use)", preset, pipeline, p)
        from omni_runtime.stages.models.family import family_for_class  # torch: only when a model is made

        family_for_class(pipeline).make_tiny(tmp, preset, seed=0)
        if p.exists():
            shutil.rmtree(p)
        tmp.rename(p)
    return p
