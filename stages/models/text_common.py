"""What the families' own text encoders (``qwen_image/text.py``, ``wan/text.py``) do the same way: load the
transformers encoder class a checkpoint names, whole or straight into its HSDP shards, and check the prompts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import transformers

from omni_runtime.parallel.hsdp import HSDPInferenceConfig, ShardCondition
from omni_runtime.stages.errors import CheckpointError, RequestError
from omni_runtime.stages.weights import TRANSFORMERS_WEIGHTS


def load_encoder(directory: Path, cls_name: str, dtype: torch.dtype, device: torch.device,
                 hsdp: HSDPInferenceConfig | None, shard_conditions: list[ShardCondition],
                 key_renames: tuple[tuple[str, str], ...] = ()) -> torch.nn.Module:
    """The transformers class ``cls_name`` (already checked against the family's allowed classes) loaded from
    ``directory``: whole, or with ``hsdp`` (shard degree > 1) built straight into its shards, one FSDP unit per
    ``shard_conditions`` match, the checkpoint's keys renamed by ``key_renames`` (module prefix -> checkpoint
    prefix). Anything a damaged checkpoint makes the loader raise becomes a ``CheckpointError`` naming it."""
    cls = getattr(transformers, cls_name)
    try:
        if hsdp is not None and hsdp.enabled:
            from omni_runtime.stages.sharded_load import build_sharded_model

            config = cls.config_class.from_pretrained(str(directory), local_files_only=True)
            cfg = dataclasses.replace(hsdp, shard_conditions=shard_conditions)
            return build_sharded_model(lambda: cls(config), directory, TRANSFORMERS_WEIGHTS, cfg, device=device,
                                       dtype=dtype, key_renames=key_renames)
        return cls.from_pretrained(str(directory), local_files_only=True, dtype=dtype)
    except CheckpointError:
        raise
    except Exception as e:  # anything a damaged checkpoint makes the loader raise (SafetensorError, ...)
        raise CheckpointError(f"{directory}: cannot load {cls_name}: {e}") from e


def check_prompts(prompts: Any) -> None:
    """Raise ``RequestError`` unless ``prompts`` is a non-empty list of strings."""
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError(f"prompts={prompts!r} is not allowed; prompts is a non-empty list of strings")
