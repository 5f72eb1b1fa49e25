"""Check a diffusers-format model directory without loading any weight: what ``check`` and ``serve`` run first.

It reads ``model_index.json`` (every component this runtime needs is listed with a class it knows), each
component's config (it parses), the tokenizer directories (present, with their files) and the header of every
safetensors file (the tensor table fits the file; the weights themselves are not read). The first problem is one
``CheckpointError`` naming the file and what is wrong.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.schedule import CLASS_NAMES as SCHEDULER_CLASSES
from omni_runtime.stages.schedule import SCHEDULER_CONFIG
from omni_runtime.stages.text_encoder import TOKENIZER_SLOTS, check_component_class
from omni_runtime.stages.weights import (
    DIFFUSERS_WEIGHTS,
    MODEL_INDEX,
    TRANSFORMERS_WEIGHTS,
    read_json,
    read_model_index,
    read_safetensors_header,
    safetensors_files,
)

logger = logging.getLogger(__name__)

# slot -> (library, allowed classes, config file, weights name); the text slots ask stages.text_encoder.
DIFFUSERS_COMPONENTS: dict[str, tuple[tuple[str, ...], str, str | None]] = {
    "transformer": (("FluxTransformer2DModel",), "config.json", DIFFUSERS_WEIGHTS),
    "vae": (("AutoencoderKL",), "config.json", DIFFUSERS_WEIGHTS),
    "scheduler": (tuple(SCHEDULER_CLASSES), SCHEDULER_CONFIG, None),
}
TEXT_COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


def check_model_dir(model_dir: str | Path) -> list[str]:
    """Check ``model_dir`` as described above; returns one line per component checked."""
    root = Path(model_dir)
    index = read_model_index(root)
    index_path = root / MODEL_INDEX
    needed = [*TEXT_COMPONENTS, *DIFFUSERS_COMPONENTS]
    missing = [n for n in needed if n not in index]
    if missing:
        raise CheckpointError(f"{index_path}: component(s) {missing} not listed; this runtime needs {needed}")
    lines = []
    for name in needed:
        library, cls_name = index[name]
        directory = root / name
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: component directory {name!r} is missing (listed in {MODEL_INDEX})")
        if name in DIFFUSERS_COMPONENTS:
            allowed, config_name, weights = DIFFUSERS_COMPONENTS[name]
            if library != "diffusers" or cls_name not in allowed:
                raise CheckpointError(f"{index_path}: {name} = [{library!r}, {cls_name!r}] is not supported; "
                                      f"allowed: diffusers {list(allowed)}")
        else:
            check_component_class(root, name, library, cls_name)
            config_name = "tokenizer_config.json" if name in TOKENIZER_SLOTS else "config.json"
            weights = None if name in TOKENIZER_SLOTS else TRANSFORMERS_WEIGHTS
        if name in TOKENIZER_SLOTS and not any((directory / f).is_file() for f in TOKENIZER_FILES):
            raise CheckpointError(f"{directory}: no tokenizer files; expected one of {list(TOKENIZER_FILES)}")
        for extra in (TOKENIZER_FILES[:2] if name in TOKENIZER_SLOTS else ()):
            if (directory / extra).is_file():
                read_json(directory / extra)
        read_json(directory / config_name)
        tensors = 0
        if weights is not None:
            for path in safetensors_files(directory, weights):
                tensors += len(read_safetensors_header(path))
        lines.append(f"{name}: {cls_name}" + (f", {tensors} tensors" if weights else ""))
    return lines
