"""Helper for the HTTP tests (no tests here): the real uvicorn server of ``serve`` (same protocol class and limits),
in a thread of the test process, on a stub orchestrator, so connection-level behaviour is tested without stages."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

from omni_runtime.runtime.config import RuntimeConfig
from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.server import create_app, uvicorn_config


class StubOrchestrator:
    """Answers each request with ``b"<prompt>:<seed>"`` per image; records what reached it."""

    started_at = 1_700_000_000.0

    def __init__(self) -> None:
        from omni_runtime.runtime.progress import ProgressBook

        self.seen: list = []
        self.ids: list = []
        self.progress = ProgressBook()

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    def health(self) -> dict[str, list[bool]]:
        return {"text_encoder": [True], "denoiser": [True], "vae": [True]}

    async def generate(self, req, request_id=None, report=None, *, on_event=None):
        self.seen.append(req)
        self.ids.append(request_id)
        self.progress.open(request_id, req.n, req.num_inference_steps, req.priority)
        self.progress.close(request_id, "completed")
        images = [f"{req.prompt}:{s}".encode() for s in req.seeds()]
        if on_event is not None:  # a streamed request: its final images as events (no previews here)
            from omni_runtime.runtime.image_stream import ImageEvent

            for i, image in enumerate(images):
                on_event(ImageEvent(i, image))
        return images


def stub_config(**server: Any) -> RuntimeConfig:
    return config_from_dict({"model": {"path": "/nowhere/tiny-flux"}, "server": {"port": 0, **server}})


class ThreadServer:
    """``with ThreadServer(cfg) as s:`` serves ``create_app(cfg, StubOrchestrator())`` on ``s.port``."""

    def __init__(self, cfg: RuntimeConfig) -> None:
        import uvicorn

        self.stub = StubOrchestrator()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            cfg.server.port = probe.getsockname()[1]
        self.port = cfg.server.port
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(create_app(cfg, self.stub), cfg, loop="asyncio")
        config.log_level = "warning"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        end = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
