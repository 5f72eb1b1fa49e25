"""The Python API: ``Omni(config).generate(prompt, ...)`` returns PIL images.

With ``in_process=False`` (the default) it starts the stage processes described by the config and an
orchestrator on a background event loop (uvloop), exactly what ``serve`` runs, minus HTTP. With
``in_process=True`` it runs ``stages.Pipeline`` in the calling process. Both give the same image for the same
seed; image ``i`` of a call with ``n`` images uses seed ``seed + i``.

    from omni_runtime.runtime import Omni

    if __name__ == "__main__":  # needed in scripts: the rank processes start from a forkserver
        with Omni("configs/default.toml") as omni:
            images = omni.generate("a red fox", size="256x256", seed=7, num_inference_steps=8)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from omni_runtime.runtime.config import RuntimeConfig, load_config
from omni_runtime.runtime.images import decode_image, encode_image
from omni_runtime.runtime.requests import GenerationRequest, parse_request

logger = logging.getLogger(__name__)


class Omni:
    def __init__(self, config: str | Path | RuntimeConfig, in_process: bool = False) -> None:
        self.cfg = config if isinstance(config, RuntimeConfig) else load_config(config)
        self.in_process = in_process
        self._pipeline = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._orch = None
        if in_process:
            from omni_runtime.runtime.model_store import ensure_model
            from omni_runtime.stages.pipeline import Pipeline

            ensure_model(self.cfg.model.path)
            self._pipeline = Pipeline.from_pretrained(self.cfg.model.path, self.cfg.model.dtype,
                                                      self.cfg.model.device, vae_tiling=self.cfg.stages.vae.tiling)
        else:
            self._start_processes()

    def _start_processes(self) -> None:
        from omni_runtime.runtime.orchestrator import Orchestrator

        try:
            import uvloop

            self._loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="omni-loop", daemon=True)
        self._thread.start()
        self._orch = Orchestrator(self.cfg)
        # A script that never calls close() still stops its ranks and frees their shm at exit. threading's exit
        # hooks run before concurrent.futures refuses new work (which the shutdown needs); atexit runs after.
        threading._register_atexit(self.close)
        try:
            asyncio.run_coroutine_threadsafe(self._orch.start(), self._loop).result()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ generation

    def submit(self, req: GenerationRequest) -> concurrent.futures.Future:
        """Start a request; the future resolves to the encoded images (``req.output_format``).

        In-process there is no concurrency: the request runs here, before the (already resolved) future returns.
        """
        if self._orch is None:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            try:
                fut.set_result(self._run_in_process(req))
            except BaseException as e:
                fut.set_exception(e)
            return fut
        return asyncio.run_coroutine_threadsafe(self._orch.generate(req), self._loop)

    def generate_encoded(self, req: GenerationRequest) -> list[bytes]:
        return self.submit(req).result()

    def generate(self, prompt: str, **fields: Any) -> list[Image.Image]:
        """Generate ``n`` images; ``fields`` are the request fields (size, n, seed, num_inference_steps, ...)."""
        req = parse_request({"prompt": prompt, **fields, "output_format": "png"})
        return [decode_image(b) for b in self.generate_encoded(req)]

    def _run_in_process(self, req: GenerationRequest) -> list[bytes]:
        arrays = self._pipeline(
            [req.prompt] * req.n, negative_prompt=req.negative_prompt, seed=req.seeds(),
            num_inference_steps=req.num_inference_steps, height=req.height, width=req.width,
            guidance_scale=req.guidance_scale, true_cfg_scale=req.true_cfg_scale)
        return [encode_image(a, req.output_format) for a in arrays]

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop the stage processes (no orphans, no shm left behind); also runs at interpreter exit."""
        if self._loop is not None:
            if self._orch is not None:
                asyncio.run_coroutine_threadsafe(self._orch.shutdown(), self._loop).result(timeout=60)
                self._orch = None
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Omni:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
