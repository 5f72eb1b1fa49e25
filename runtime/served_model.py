"""What the HTTP edge knows of the served model's family, read once from its ``model_index.json``: the
declarations (``stages.models.family.ModelFamily``) a request is checked against before any stage sees it.

- ``edits_only``: a generation (no input image) is a 400 naming ``image`` (Qwen-Image-Edit and -Plus);
- ``cache_refusals``: a ``cache`` method the family cannot run (TeaCache on Wan, Qwen-Image) is a 400 naming
  ``cache``, the reason and the methods allowed (the route would otherwise accept a video job that then fails);
- ``request_defaults``: the defaults of absent fields where the family's diffusers pipeline has its own (Qwen-Image:
  50 steps, ``true_cfg_scale`` 4.0), so a request that leaves them out gets the pipeline's image.

The stages keep their own checks as the second line of defence.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from omni_runtime.runtime.requests import GenerationRequest, RequestError, WorkCaps, parse_request
from omni_runtime.stages.cache_config import METHODS

__all__ = ["ServedModel", "check_served", "defaults_of", "parse_served", "served_model", "served_model_of"]


@dataclass(frozen=True)
class ServedModel:
    """The family declarations the edge checks requests against."""

    family: str
    pipeline: str
    edits_only: bool = False
    cache_refusals: tuple[tuple[str, str], ...] = ()  # (method, why)
    defaults: tuple[tuple[str, Any], ...] = ()  # (request field, the family pipeline's default)


@lru_cache(maxsize=8)
def served_model(path: str) -> ServedModel:
    """The :class:`ServedModel` of a model directory (read once)."""
    from omni_runtime.stages.models.family import family_of

    family = family_of(path)
    return ServedModel(family=family.name, pipeline=family.pipeline_classes[0], edits_only=family.edits_only,
                       cache_refusals=tuple(family.cache_refusals.items()),
                       defaults=tuple(family.request_defaults.items()))


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


def defaults_of(model: ServedModel | None) -> dict[str, Any]:
    """The request defaults of ``model``'s family (none where the model is unknown here)."""
    return dict(model.defaults) if model is not None else {}


def parse_served(raw: Any, model: ServedModel | None, *, allow_unknown: bool = True,
                 caps: WorkCaps | None = None) -> GenerationRequest:
    """A generation request for the served ``model``: :func:`~omni_runtime.runtime.requests.parse_request` with the
    family's request defaults, then :func:`check_served`."""
    req = parse_request(raw, allow_unknown=allow_unknown, caps=caps, defaults=defaults_of(model))
    check_served(req, model)
    return req
