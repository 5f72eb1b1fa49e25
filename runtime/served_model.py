"""What the HTTP edge knows of the served model's family, read once from its ``model_index.json``: the
declarations (``stages.models.family.ModelFamily``) a request is checked against before any stage sees it.

- ``edits_only``: a generation (no input image) is a 400 naming ``image`` (Qwen-Image-Edit and -Plus);
- ``cache_refusals``: a ``cache`` method the family cannot run (TeaCache on Wan, Qwen-Image) is a 400 naming
  ``cache``, the reason and the methods allowed (the route would otherwise accept a video job that then fails);
- ``request_defaults``: the defaults of absent fields where the family's diffusers pipeline has its own (Qwen-Image:
  50 steps, ``true_cfg_scale`` 4.0), so a request that leaves them out gets the pipeline's image.

The stages keep their own checks as the second line of defence.

The served layout's refusals (``_layout_cache_refusals``, from the config) join the family's: TeaCache under HSDP
(``[stages.denoiser.parallel] hsdp_shard > 1``) is the same 400, before the request reaches the denoiser. A model
directory that cannot be read is logged once (a warning naming the path and the error) and remembered like a
readable one, until its ``model_index.json`` changes (an embedded model made on first use is read then).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from omni_runtime.runtime.requests import GenerationRequest, RequestError, WorkCaps, parse_request
from omni_runtime.stages.cache_config import METHODS

logger = logging.getLogger(__name__)

__all__ = ["ServedModel", "check_served", "defaults_of", "parse_served", "served_model", "served_model_of"]


@dataclass(frozen=True)
class ServedModel:
    """The family declarations the edge checks requests against."""

    family: str
    pipeline: str
    #: (method, why) the served layout cannot run (``_layout_cache_refusals``), next to the family's
    layout_refusals: tuple[tuple[str, str], ...] = ()
    edits_only: bool = False
    video: bool = False  # a video model: it answers /v1/videos, not /v1/images/generations
    cache_refusals: tuple[tuple[str, str], ...] = ()  # (method, why)
    defaults: tuple[tuple[str, Any], ...] = ()  # (request field, the family pipeline's default)


@lru_cache(maxsize=8)
def served_model(path: str) -> ServedModel:
    """The :class:`ServedModel` of a model directory (read once)."""
    from omni_runtime.stages.models.family import family_of

    family = family_of(path)
    return ServedModel(family=family.name, pipeline=family.pipeline_classes[0], edits_only=family.edits_only,
                       video=family.video, cache_refusals=tuple(family.cache_refusals.items()),
                       defaults=tuple(family.request_defaults.items()))


def _index_stamp(path: str) -> tuple[int, int] | None:
    """``model_index.json``'s (mtime, size), None where there is none: what a cached read is valid for."""
    try:
        st = os.stat(Path(path) / "model_index.json")
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=8)
def _read(path: str, stamp: tuple[int, int] | None) -> ServedModel | None:
    """:func:`served_model`, or None (logged once) where the directory cannot be read."""
    try:
        return served_model(path)
    except Exception as e:  # no readable model here (a stub orchestrator's config): the stages answer
        logger.warning("the served model at %s cannot be read (%s: %s): requests are not checked against its "
                       "family at the edge; the stages answer them", path, type(e).__name__, e)
        return None


def _layout_cache_refusals(cfg: Any) -> tuple[tuple[str, str], ...]:
    """The cache methods the served parallel layout cannot run (the denoiser refuses them too), with why."""
    shard = cfg.stages.denoiser.parallel.hsdp_shard
    if shard > 1:
        return (("teacache", f"not supported with HSDP ([stages.denoiser.parallel] hsdp_shard = {shard}: the "
                             f"first block's modulation weights are sharded outside its forward)"),)
    return ()


def served_model_of(cfg: Any) -> ServedModel | None:
    """The served model of a config with its layout's refusals; None where its directory cannot be read and the
    layout refuses nothing (a stub orchestrator's config; serving checks the model before it starts). Read once
    per state of the directory, a failure as a success."""
    path = str(cfg.model.path)
    model = _read(path, _index_stamp(path))
    layout = _layout_cache_refusals(cfg)
    if not layout:
        return model
    return replace(model if model is not None else ServedModel(family="unread", pipeline="unread"),
                   layout_refusals=layout)


def check_served(req: GenerationRequest, model: ServedModel | None) -> None:
    """Raise :class:`RequestError` naming the field when ``model``'s family or the served layout cannot run ``req``."""
    if model is None:
        return
    if model.edits_only and not req.is_edit:
        raise RequestError(f"image is required: the served model is a {model.family} model ({model.pipeline}), "
                           f"which only edits images; allowed: an edit with input images (POST /v1/images/edits, "
                           f"generate --image, Omni.edit)", "image")
    family, layout = dict(model.cache_refusals), dict(model.layout_refusals)
    method = req.cache.method if req.cache is not None else None
    if method in family or method in layout:  # the family's words first
        why = f"the {model.family} family {family[method]}" if method in family else layout[method]
        allowed = ", ".join(m for m in METHODS if m not in family and m not in layout)
        raise RequestError(f"cache.method={method!r}: {why}; allowed: {allowed}", "cache")


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
