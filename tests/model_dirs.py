"""Tiny model directories on disk in tests: copies with parts changed (for the tests of how a checkpoint variant is
loaded or refused), and every weight of one (to compare two directories)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def model_copy(src: Path, dst: Path, index: dict[str, Any] | None = None) -> Path:
    """A copy of the model directory ``src`` at ``dst``, its ``model_index.json`` updated with ``index``."""
    shutil.copytree(src, dst)
    if index:
        edit_index(dst, index)
    return dst


def edit_index(model: Path, index: dict[str, Any]) -> None:
    """Update ``model``'s ``model_index.json`` with ``index`` (in place)."""
    path = model / "model_index.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **index}))


def with_unipc_scheduler(model: Path) -> Path:
    """``model`` (a Wan directory, changed in place) with the ``UniPCMultistepScheduler`` (flow sigmas, shift 3)
    that Wan 2.2's real checkpoints ship instead of the tiny model's scheduler."""
    from diffusers import UniPCMultistepScheduler

    shutil.rmtree(model / "scheduler")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                            flow_shift=3.0).save_config(model / "scheduler")
    edit_index(model, {"scheduler": ["diffusers", "UniPCMultistepScheduler"]})
    return model


def all_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file under ``directory``, keyed ``<the file's folder>/<tensor name>``."""
    out = {}
    for f in sorted(directory.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.parent.name}/{k}"] = v
    return out
