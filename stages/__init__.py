"""What each stage computes: text encoding, the denoising loop, VAE decode; models; weight loading.
May import ``parallel`` and ``comm``."""

from __future__ import annotations

import importlib
from typing import Any

# Exports load on first use, so ``import stages.errors`` (the frontend does) does not import transformers.
_EXPORTS = {
    "DenoiseRequest": "omni_runtime.stages.denoiser",
    "DenoiserStage": "omni_runtime.stages.denoiser",
    "StageItem": "omni_runtime.stages.engine",
    "load_engine": "omni_runtime.stages.engine",
    "TextEncoderStage": "omni_runtime.stages.text_encoder",
    "VaeDecoderStage": "omni_runtime.stages.vae",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stages' has no attribute {name!r}")
