"""What the HTTP edge knows of the served model's family, read once from its ``model_index.json``: the
declarations (``stages.models.family.ModelFamily``) a request is checked against before any stage sees it.

- ``edits_only``: a generation (no input image) is a 400 naming ``image`` (Qwen-Image-Edit and -Plus);
- ``cache_refusals``: a ``cache`` method the family cannot run (TeaCache on Wan, Qwen-Image) is a 400 naming
  ``cache``, the reason and the methods allowed (the route would otherwise accept a video job that then fails);

The stages keep their own checks as the second line of defence.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from omni_runtime.runtime.requests import GenerationRequest, RequestError
from omni_runtime.stages.cache_config import METHODS

__all__ = ["ServedModel", "check_served", "served_model", "served_model_of"]


@dataclass(frozen=True)
class ServedModel:
    """The family declarations the edge checks requests against."""

    family: str
    pipeline: str
    edits_only: bool = False
    cache_refusals: tuple[tuple[str, str], ...] = ()  # (method, why)


@lru_cache(maxsize=8)
def served_model(path: str) -> ServedModel:
    """The :class:`ServedModel` of a model directory (read once)."""
    from omni_runtime.stages.models.family import family_of

    family = family_of(path)
    return ServedModel(family=family.name, pipeline=family.pipeline_classes[0], edits_only=family.edits_only,
                       cache_refusals=tuple(family.cache_refusals.items()))


def served_model_of(cfg: Any) -> ServedModel | None:
    """The served model of a config, or None where its directory cannot be read (a stub orchestrator's config;
    serving checks the model before it starts)."""
    try:
        return served_model(str(cfg.model.path))
    except Exception:  # no readable model here: the stages answer
        return None


def check_served(req: GenerationRequest, model: ServedModel | None) -> None:
    """Raise :class:`RequestError` naming the field when ``model``'s family declares it cannot run ``req``."""
    if model is None:
        return
    if model.edits_only and not req.is_edit:
        raise RequestError(f"image is required: the served model is a {model.family} model ({model.pipeline}), "
                           f"which only edits images; allowed: an edit with input images (POST /v1/images/edits, "
                           f"generate --image, Omni.edit)", "image")
    refused = dict(model.cache_refusals)
    if req.cache is not None and req.cache.method in refused:
        allowed = ", ".join(m for m in METHODS if m not in refused)
        raise RequestError(f"cache.method={req.cache.method!r}: the {model.family} family "
                           f"{refused[req.cache.method]}; allowed: {allowed}", "cache")
