"""Loading a family's transformer from a diffusers ``transformer/`` directory, the same way for every family.

A transformer class declares what differs (``config_class``, ``class_names``, ``keep_fp32``) and its
``from_pretrained`` calls :func:`load_transformer` with what only it knows (how to build it, which tensors this rank
skips); the rest is here: finding the directory, reading its config strictly, HSDP sharding, pipeline stages, the
strict load and the log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni_runtime.parallel.hsdp import HSDPInferenceConfig
from omni_runtime.parallel.strategies.pipeline_parallel import partition_model
from omni_runtime.stages.device import resolve_device, resolve_dtype
from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.weights import (
    DIFFUSERS_WEIGHTS,
    MODEL_INDEX,
    component_dir,
    load_into,
    load_safetensors,
    read_config,
)

logger = logging.getLogger(__name__)

Skip = Callable[[str], bool]


def refuse_expert_parallel(ep_group: Any, family: str) -> None:
    """Raise unless ``ep_group`` is None or of one rank: a transformer without mixture-of-experts layers."""
    if ep_group is not None and getattr(ep_group, "world_size", 1) > 1:
        raise ValueError(f"expert parallelism (an ep group of {ep_group.world_size} ranks) is not supported by "
                         f"{family}: it has no mixture-of-experts layers; allowed: ep = 1")


def transformer_dir(path: str | Path) -> Path:
    """The ``transformer/`` directory of ``path`` (a model directory holding one, or that directory itself)."""
    path = Path(path)
    if (path / MODEL_INDEX).is_file():
        path = component_dir(path, "transformer")
    if not path.is_dir():
        raise CheckpointError(f"{path}: transformer directory not found")
    return path


def _stage_skip(model: nn.Module, other: Skip | None) -> Skip:
    """Skip what ``model`` (one pipeline stage) does not hold, and what ``other`` skips."""
    wanted = set(model.state_dict())

    def skip(key: str) -> bool:  # another stage's tensor (or what ``other`` skips)
        return key not in wanted or (other is not None and other(key))
    return skip


def _is_fp32_part(key: str, parts: tuple[str, ...]) -> bool:
    return any(part in key.split(".") for part in parts)


def load_transformer(cls: Any, path: str | Path, *, dtype: torch.dtype | str, device: str | torch.device,
                     hsdp: HSDPInferenceConfig | None, pp_group: Any,
                     build: Callable[[Any], nn.Module] | None = None,
                     skip_for: Callable[[Any], Skip | None] | None = None) -> Any:
    """``cls`` (a transformer class declaring ``config_class``, ``class_names`` and ``keep_fp32``) loaded from
    ``path`` strictly: see e.g. ``FluxTransformer.from_pretrained``.

    ``build(config)`` makes the model (default ``cls(config)``); ``skip_for(config)`` says which tensors this rank
    does not read (e.g. another expert-parallel rank's experts; None: all). The tensors of the parts named in
    ``cls.keep_fp32`` (checkpoint key components) stay float32 whatever ``dtype`` (diffusers'
    ``_keep_in_fp32_modules``) when the model is loaded whole."""
    path = transformer_dir(path)
    config = cls.config_class.from_dict(read_config(path, allowed_classes=cls.class_names), path / "config.json")
    torch_dtype, device = resolve_dtype(dtype), resolve_device(device)
    make = (lambda: build(config)) if build is not None else (lambda: cls(config))
    name = cls.__name__
    if hsdp is not None and hsdp.enabled:
        if pp_group is not None and pp_group.world_size > 1:
            raise ValueError("HSDP sharding and pipeline parallelism together are not supported")
        from omni_runtime.stages.sharded_load import build_sharded_model

        model = build_sharded_model(make, path, DIFFUSERS_WEIGHTS, hsdp, device=device, dtype=torch_dtype)
        logger.info("loaded %s from %s sharded over %d ranks (%s, %s)", name, path, hsdp.hsdp_shard_size,
                    torch_dtype, device)
        return model
    with torch.device("meta"):
        model = make()
    skip = skip_for(config) if skip_for is not None else None
    if pp_group is not None and pp_group.world_size > 1:
        partition_model(model, pp_group.rank_in_group, pp_group.world_size)
        skip = _stage_skip(model, skip)
    fp32_parts = tuple(cls.keep_fp32)
    state = load_safetensors(path, DIFFUSERS_WEIGHTS, device=device, dtype=None if fp32_parts else torch_dtype,
                             skip=skip)
    if fp32_parts:
        state = {k: v.to(torch.float32 if _is_fp32_part(k, fp32_parts) else torch_dtype)
                 if v.is_floating_point() else v for k, v in state.items()}
    load_into(model, state, path)
    logger.info("loaded %s from %s (%d tensors, %s, %s)", name, path, len(state), torch_dtype, device)
    return model.eval().requires_grad_(False)
