"""The Python API: ``Omni(config).generate(prompt, ...)`` returns PIL images.

It runs an orchestrator on a background event loop (uvloop), exactly what ``serve`` runs, minus HTTP. With
``in_process=False`` (the default) every stage replica is a group of rank processes; with ``in_process=True`` the
same stage engines run on threads of the calling process (``runtime.stage_client.InProcessStageClient``): one
pipeline either way, so both give the same image for the same seed. Image ``i`` of a call with ``n`` images uses
seed ``seed + i``.

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

import numpy as np
from PIL import Image

from omni_runtime.parallel.parallel_spec import DEGREES
from omni_runtime.runtime.config import STAGE_NAMES, ConfigError, RuntimeConfig
from omni_runtime.runtime.config_load import load_config
from omni_runtime.runtime.images import decode_image
from omni_runtime.runtime.requests import FIELDS, GenerationRequest, WorkCaps, check_work

logger = logging.getLogger(__name__)

# The keywords of :meth:`Omni.generate`: the request fields but the prompt (its first argument) and the output
# format (it returns PIL images; :meth:`Omni.submit` takes any ``GenerationRequest``).
GENERATE_FIELDS = tuple(sorted(set(FIELDS) - {"prompt", "output_format"}))


def check_in_process(cfg: RuntimeConfig) -> None:
    """``in_process=True`` runs one rank of every stage in this process: a stage of several ranks would run
    unsharded without a word, so such a config is refused naming its degrees."""
    multi = [f"stages.{s}.parallel ({cfg.stages.get(s).world_size} ranks: "
             f"{', '.join(f'{k} = {v}' for k, v in _degrees(cfg.stages.get(s)).items())})"
             for s in STAGE_NAMES if cfg.stages.get(s).world_size > 1]
    if multi:
        raise ConfigError(f"Omni(config, in_process=True) runs each stage on one rank in this process, but "
                          f"{'; '.join(multi)}; allowed: in_process=False (the default) to run the parallel layout "
                          f"in rank processes, or a config whose parallel degrees are all 1 (the single-rank "
                          f"reference the parallel layouts are tested against)")


def _degrees(stage: Any) -> dict[str, int]:
    par = stage.parallel
    return {("patch" if d == "vae_patch" else d): getattr(par, d) for d in DEGREES if getattr(par, d) > 1}


def _image_bytes(x: Any) -> bytes:
    """An input image as the bytes of an image file: a path is read, a PIL image written as PNG."""
    import io

    if isinstance(x, bytes):
        return x
    if isinstance(x, Image.Image):
        buf = io.BytesIO()
        x.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(x, (str, Path)):
        from omni_runtime.runtime.edit_requests import read_image_file

        return read_image_file(x)
    raise TypeError(f"image: {type(x).__name__}; allowed: a file path, bytes of an image file, a PIL image")


#: seconds :meth:`Omni.close` waits for the cancelled tasks' cleanup
SETTLE_S = 30.0


async def _settle_tasks() -> None:
    """Cancel every task of the running loop but this one and wait until each has run its cleanup (as
    ``asyncio.run`` does at its end): a request whose stages are gone, or one that was failing while the runtime
    shut down, must not be left pending in a closed loop (``Task was destroyed but it is pending``)."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Omni:
    def __init__(self, config: str | Path | RuntimeConfig, in_process: bool = False) -> None:
        self.cfg = config if isinstance(config, RuntimeConfig) else load_config(config)
        self.in_process = in_process
        if in_process:
            check_in_process(self.cfg)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._orch = None
        self._start()

    def _start(self) -> None:
        from omni_runtime.runtime.orchestrator import Orchestrator
        from omni_runtime.runtime.preflight import check_machine

        self.caps = WorkCaps.from_config(self.cfg)  # the Python API is an edge too: the same caps as HTTP
        check_machine(self.cfg)  # ConfigError naming the key before any process starts
        try:
            import uvloop

            self._loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="omni-loop", daemon=True)
        self._thread.start()
        self._orch = Orchestrator(self.cfg, in_process=self.in_process)
        # A script that never calls close() still stops its ranks and frees their shm at exit. threading's exit
        # hooks run before concurrent.futures refuses new work (which the shutdown needs); atexit runs after.
        threading._register_atexit(self.close)
        try:
            asyncio.run_coroutine_threadsafe(self._orch.start(), self._loop).result()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ generation

    def submit(self, req: GenerationRequest, report: dict[str, Any] | None = None) -> concurrent.futures.Future:
        """Start a request; the future resolves to the encoded images (``req.output_format``). Cancelling the
        future cancels the request (its items leave the stages, also a running denoiser batch). ``report`` gets
        the response's extension fields (``cache``) when it is done."""
        if self._orch is None:
            raise RuntimeError("this Omni is closed")
        if req.num_frames == 1:  # a video was checked against [video]'s caps by runtime.video_request
            check_work(req, self.caps)
        return asyncio.run_coroutine_threadsafe(self._orch.generate(req, report=report), self._loop)

    def generate_encoded(self, req: GenerationRequest, report: dict[str, Any] | None = None) -> list[bytes]:
        return self.submit(req, report).result()

    def generate(self, prompt: str, **fields: Any) -> list[Image.Image]:
        """Generate ``n`` images; ``fields`` are the request fields (size, n, seed, num_inference_steps, ...): any
        other keyword is a ``TypeError`` naming the allowed ones (:data:`GENERATE_FIELDS`). ``cache``: the
        request's cache acceleration (``{"method": "first_block", "threshold": 0.1}``, the HTTP field; absent: the
        config's ``[stages.denoiser.cache]``); what it skipped is in each image's ``info["cache"]`` (summed over
        the request's images, as the HTTP response's ``cache``)."""
        from omni_runtime.runtime.video_offline import refuse_images

        unknown = sorted(set(fields) - set(GENERATE_FIELDS))
        if unknown:
            raise TypeError(f"Omni.generate() got an unexpected keyword argument {unknown[0]!r}; allowed: "
                            f"{', '.join(GENERATE_FIELDS)}")
        from omni_runtime.runtime.served_model import parse_served, served_model_of

        # the family's defaults of absent fields; e.g. an edit-only model is refused: use Omni.edit
        req = parse_served({"prompt": prompt, **fields, "output_format": "png"}, served_model_of(self.cfg))
        refuse_images(self.cfg, "Omni.generate")
        report: dict[str, Any] = {}
        images = [decode_image(b) for b in self.generate_encoded(req, report)]
        for im in images:
            if "cache" in report:
                im.info["cache"] = report["cache"]
            if "peak_memory_mb" in report:
                im.info["peak_memory_mb"] = report["peak_memory_mb"]
        return images

    def edit(self, prompt: str, image: Any, mask: Any = None, **fields: Any) -> list[Image.Image]:
        """Edit ``image`` (a file path, bytes of an image file, a PIL image, or a list of those) with an image-edit
        model (FluxKontextPipeline); ``fields`` as :meth:`generate`'s, ``size`` defaults to ``"auto"`` (the first
        image's size rounded down to the model's multiple). Checked as ``POST /v1/images/edits`` checks it."""
        from omni_runtime.runtime.edit_requests import edit_rules, parse_edit_request

        images = [_image_bytes(x) for x in (image if isinstance(image, list) else [image])]
        req = parse_edit_request({"prompt": prompt, **fields, "output_format": "png"}, images, edit_rules(self.cfg),
                                 mask=None if mask is None else _image_bytes(mask), allow_unknown=False)
        return [decode_image(b) for b in self.generate_encoded(req)]

    def generate_video(self, prompt: str, **fields: Any) -> np.ndarray:
        """Generate one video with a video model (Wan); ``fields`` are those of ``POST /v1/videos`` (size,
        num_frames or seconds, seed, num_inference_steps, guidance_scale, negative_prompt, ...). Returns its
        frames, (num_frames, height, width, 3) uint8 (``runtime.video_files.encode_mp4`` writes an mp4)."""
        from omni_runtime.runtime.video_files import decode_frames
        from omni_runtime.runtime.video_offline import parse_video

        vr = parse_video({"prompt": prompt, **fields}, self.cfg)
        return decode_frames(self.generate_encoded(vr.req)[0])

    # ------------------------------------------------------------------ LoRA adapters (issue 25)

    def load_lora(self, name: str, path: str | Path) -> dict[str, Any]:
        """Register an adapter file as ``name`` (checked against the model; no ``allowed_roots`` confinement: the
        caller is this process); requests name it in their ``lora`` field."""
        if self._orch is None:
            raise RuntimeError("this Omni is closed")
        return self._orch.loras.add(name, str(path), source="python").as_json()

    def list_loras(self) -> list[dict[str, Any]]:
        return [e.as_json() for e in self._orch.loras.list()] if self._orch is not None else []

    def unload_lora(self, name: str) -> bool:
        return self._orch.loras.remove(name) if self._orch is not None else False

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop the stage processes (no orphans, no shm left behind); also runs at interpreter exit. Requests
        still in flight end cancelled, each having run its cleanup before the loop closes."""
        if self._loop is not None:
            if self._orch is not None:
                asyncio.run_coroutine_threadsafe(self._orch.shutdown(), self._loop).result(timeout=60)
                self._orch = None
            try:
                asyncio.run_coroutine_threadsafe(_settle_tasks(), self._loop).result(timeout=SETTLE_S)
            except TimeoutError:
                logger.warning("Omni.close: tasks still running %.0f s after they were cancelled; closing anyway",
                               SETTLE_S)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Omni:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
