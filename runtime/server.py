"""``omni-runtime serve``: an OpenAI-compatible images API on FastAPI + uvicorn (uvloop).

:func:`create_app` composes the API modules in :data:`API_MODULES` (each ``register(app, ctx)`` adds its routes,
request schema and errors over the one :class:`~runtime.http_common.ApiContext`: auth, the error mapper, metrics):
``images_api`` (``POST /v1/images/generations``), ``edits_api`` (``POST /v1/images/edits``), ``ops_api``
(``GET /v1/requests/{id}``, ``/v1/models``, ``/health``, ``/metrics``), ``lora_api`` (``/v1/loras``); ``/docs``.
Errors use the OpenAI body ``{"error": {"message", "type", "param", "code"}}`` on every route
(``runtime/http_common.py``).
The stage processes start in the lifespan hook, so uvicorn accepts connections only once every stage is ready;
SIGINT/SIGTERM stop uvicorn, whose lifespan shutdown stops the stages and sweeps their shared memory.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from omni_runtime.runtime import edits_api, images_api, lora_api, ops_api, video_api
from omni_runtime.runtime.config import ConfigError, RuntimeConfig
from omni_runtime.runtime.http_common import REQUEST_ID_HEADER, ApiContext, install_error_handlers
from omni_runtime.runtime.images_api import generations_responses
from omni_runtime.runtime.metrics import Metrics
from omni_runtime.runtime.orchestrator import Orchestrator
from omni_runtime.runtime.requests import WorkCaps

logger = logging.getLogger(__name__)

__all__ = ["API_MODULES", "REQUEST_ID_HEADER", "create_app", "generations_responses", "serve"]

#: The API modules the app is composed of, in route order: each has ``register(app: FastAPI, ctx: ApiContext)``.
#: A new API is one module with such a function and one entry here.
API_MODULES: tuple[Any, ...] = (images_api, edits_api, ops_api, lora_api, video_api)


def create_app(cfg: RuntimeConfig, orchestrator: Orchestrator | None = None) -> FastAPI:
    """The app; its lifespan starts (and at exit stops) an :class:`Orchestrator` for ``cfg``."""
    ctx = ApiContext(cfg=cfg, metrics=Metrics(), caps=WorkCaps.from_config(cfg))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        orch = orchestrator or Orchestrator(cfg, ctx.metrics)
        app.state.orch = orch

        def fatal(reason: str) -> None:  # the orchestrator cannot serve any more: stop serving, exit non-zero
            app.state.fatal = reason
            request_exit = getattr(app.state, "request_exit", None)
            if request_exit is not None:
                request_exit()

        orch.on_fatal = fatal
        try:
            await orch.start()
            yield
        finally:
            await orch.shutdown()

    app = FastAPI(title="omni-runtime", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible image generation and editing served by staged diffusion "
                              "processes.")
    install_error_handlers(app)
    for module in API_MODULES:
        module.register(app, ctx)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for patch in ctx.openapi_patches:
                patch(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.metrics = ctx.metrics
    return app


def check_listen(host: str, port: int) -> None:
    """Bind ``host:port`` once and let go, before any stage starts: a busy port or a bad host is one error at
    once instead of a failure after every stage has loaded. (uvicorn binds for real only when the stages are
    ready, so clients are refused, not left hanging, until then.)"""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            sock.bind(addr)
    except OSError as e:
        raise ConfigError(f"server.host = {host!r}, server.port = {port}: cannot listen there "
                          f"({e.strerror or e}); allowed: a free port on a local address (--host/--port "
                          f"override the config)") from None


def uvicorn_config(app: FastAPI, cfg: RuntimeConfig, loop: str = "auto") -> Any:
    """uvicorn's settings from ``[server]``: h11 with header/body read deadlines, the keep-alive timeout and the
    connection limit (beyond it uvicorn answers 503)."""
    import uvicorn

    from omni_runtime.runtime.http_protocol import guarded_h11_protocol

    s = cfg.server
    return uvicorn.Config(app, host=s.host, port=s.port, loop=loop, log_level="info", timeout_graceful_shutdown=5,
                          http=guarded_h11_protocol(s.header_timeout_s, s.body_timeout_s),
                          timeout_keep_alive=s.keep_alive_timeout_s,  # type: ignore[arg-type]
                          limit_concurrency=s.max_connections)


def serve(cfg: RuntimeConfig) -> int:
    """Run the server until SIGINT/SIGTERM; returns the exit code (1 if the stages never became ready, or if the
    frontend failed while serving: then it stops at once instead of answering 504 forever). Runs the
    preflight and a bind check first: a problem there raises ``ConfigError``/``CheckpointError`` (CLI exit 2)."""
    import uvicorn

    from omni_runtime.runtime.preflight import preflight

    for line in preflight(cfg):  # machine, host, model directory: one error before any stage starts
        logger.info("preflight: %s", line)
    check_listen(cfg.server.host, cfg.server.port)
    try:
        import setproctitle

        setproctitle.setproctitle(f"omni-runtime: frontend {cfg.server.host}:{cfg.server.port}")
    except ImportError:  # pragma: no cover - it is a dependency
        pass
    app = create_app(cfg)
    loop = "uvloop"
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - Windows
        loop = "asyncio"
    server = uvicorn.Server(uvicorn_config(app, cfg, loop))
    app.state.request_exit = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    except SystemExit:  # uvicorn exits with 3 when the lifespan startup (the stages) or the bind failed
        if server.started:
            raise
    if not server.started:
        logger.error("not serving: the stage processes did not become ready or %s:%d could not be bound; "
                     "the log lines above say why", cfg.server.host, cfg.server.port)
        return 1
    fatal = getattr(app.state, "fatal", None)
    if fatal:
        logger.error("stopped serving because the frontend failed: %s", fatal)
        return 1
    return 0
