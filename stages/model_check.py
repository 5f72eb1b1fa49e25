"""Check a diffusers-format model directory without loading any weight: what ``check`` and ``serve`` run first.

It reads ``model_index.json`` (its ``_class_name`` names a served model family, and every component that family
needs is listed with a class it knows), each component's config (it parses), the tokenizer directories (present,
with their files) and the header of every safetensors file (the tensor table fits the file; the weights themselves
are not read). The first problem is one ``CheckpointError`` naming the file and what is wrong.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.models.family import Component, family_of
from omni_runtime.stages.text_encoder import check_tokenizer_class
from omni_runtime.stages.weights import (
    MODEL_INDEX,
    read_json,
    read_model_index,
    read_safetensors_header,
    safetensors_files,
)

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


def check_component(root: Path, name: str, library: str, cls_name: str, component: Component) -> None:
    """Raise ``CheckpointError`` unless ``[library, cls_name]`` of ``model_index.json`` can fill slot ``name``."""
    where = f"{root / MODEL_INDEX}: {name} = [{library!r}, {cls_name!r}]"
    if component.tokenizer:
        check_tokenizer_class(where, library, cls_name)
    elif library != component.library or cls_name not in component.classes:
        raise CheckpointError(f"{where} is not supported; allowed: {component.library} {list(component.classes)}")


def check_model_dir(model_dir: str | Path) -> list[str]:
    """Check ``model_dir`` as described above; returns one line per component checked."""
    root = Path(model_dir)
    family = family_of(root)
    index = read_model_index(root)
    index_path = root / MODEL_INDEX
    family.check_pipeline_config(read_json(index_path), index_path)
    needed = list(family.components)
    missing = [n for n in needed if n not in index]
    if missing:
        raise CheckpointError(f"{index_path}: component(s) {missing} not listed; the {family.name} family "
                              f"({', '.join(family.pipeline_classes)}) needs {needed}")
    lines = []
    slots = {**family.components, **{slot: family.components["transformer"] for slot in
                                     family.expert_schedule(root).slots if slot not in family.components}}
    for name, component in slots.items():  # further experts (stages.experts) as the transformer
        library, cls_name = index[name]
        directory = root / name
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: component directory {name!r} is missing (listed in {MODEL_INDEX})")
        check_component(root, name, library, cls_name, component)
        if component.tokenizer and not any((directory / f).is_file() for f in TOKENIZER_FILES):
            raise CheckpointError(f"{directory}: no tokenizer files; expected one of {list(TOKENIZER_FILES)}")
        for extra in (TOKENIZER_FILES[:2] if component.tokenizer else ()):
            if (directory / extra).is_file():
                read_json(directory / extra)
        read_json(directory / component.config)
        tensors = 0
        if component.weights is not None:
            for path in safetensors_files(directory, component.weights):
                tensors += len(read_safetensors_header(path))
        lines.append(f"{name}: {cls_name}" + (f", {tensors} tensors" if component.weights else ""))
    return lines
