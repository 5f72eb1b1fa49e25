"""The operational routes: ``GET /v1/requests/{id}`` (a request's progress), ``GET /v1/models``, ``GET /health``,
``GET /metrics``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from omni_runtime.runtime.http_common import ApiContext, documented, invalid
from omni_runtime.runtime.requests import show

logger = logging.getLogger(__name__)

__all__ = ["register"]


def register(app: FastAPI, ctx: ApiContext) -> None:
    """Add the routes to ``app``."""
    cfg, metrics = ctx.cfg, ctx.metrics

    @app.get("/v1/requests/{request_id}", responses=documented({
        401: "invalid_api_key",
        404: "not_found: no request with this id is in flight or recently finished"}))
    async def request_progress(request_id: str, request: Request) -> Response:
        """A request's progress: ``status`` (queued, running, completed, failed, cancelled), ``steps_done`` /
        ``steps_total`` (denoising steps over its images) and the same per image; kept for the last 1024
        finished requests. The id is the ``X-Request-Id`` header the client sent, or the one the answer carries."""
        denied = ctx.auth(request)
        if denied is not None:
            return denied
        p = request.app.state.orch.progress.get(request_id)
        if p is None:
            return invalid(f"no request with id {show(request_id)} is in flight or recently finished",
                           "request_id", "not_found", 404)
        return JSONResponse(p.as_json())

    @app.get("/v1/models", responses=documented({401: "invalid_api_key"}))
    async def models(request: Request) -> Response:
        denied = ctx.auth(request)
        if denied is not None:
            return denied
        return JSONResponse({"object": "list", "data": [
            {"id": Path(cfg.model.path).name, "object": "model", "created": int(request.app.state.orch.started_at),
             "owned_by": "omni-runtime"}]})

    @app.get("/health", responses={503: {"description": "a stage has no replica that can serve (hung, "
                                                          "restarting) or the server failed"}})
    async def health(request: Request) -> Response:
        """200 ``ok`` when every replica is ready, 200 ``degraded`` when a replica is not but every stage has one
        that is, 503 ``unavailable`` while a stage has none; ``stages``: readiness by replica; ``replicas``: each
        replica's state (ready, starting, hung, restarting), generation and last failure."""
        orch = request.app.state.orch
        stages = orch.health()
        serving = all(any(v) for v in stages.values())
        status = "ok" if all(all(v) for v in stages.values()) else "degraded" if serving else "unavailable"
        body: dict[str, Any] = {"status": status, "stages": stages}
        replica_health = getattr(orch, "replica_health", None)
        if replica_health is not None:
            body["replicas"] = replica_health()
        return JSONResponse(body, status_code=200 if serving else 503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses=documented({401: "invalid_api_key (metrics_require_key)"}))
    async def metrics_route(request: Request) -> Response:
        if cfg.server.metrics_require_key:
            denied = ctx.auth(request)
            if denied is not None:
                return denied
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")
