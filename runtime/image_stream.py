"""A streamed request's images in the orchestrator: its previews (partial images) and its final images, as events.

The denoiser sends a :class:`~runtime.messages.Preview` (the predicted clean latent at one of the request's evenly
spaced steps, ``partial_images`` of them per image) for every image of a streamed request; :class:`ImageStream`
has each one decoded by the VAE stage as a ``"preview"`` item (which the VAE runs only when no final image waits:
``runtime.stage_exec``) and hands the decoded image to ``on_event`` as an :class:`ImageEvent` with its
``partial_image_index`` (0, 1, ... per image, in step order). The final image of image ``i`` is an event too; once
it is out, the previews of image ``i`` still in flight are cancelled (OpenAI's rule: the final image may come before
all the partials). A preview that fails costs only itself: the request goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from omni_runtime.runtime import tensor_handoff
from omni_runtime.runtime.messages import Preview, Result, Work
from omni_runtime.runtime.requests import GenerationRequest
from omni_runtime.stages.engine import PREVIEW

logger = logging.getLogger(__name__)

__all__ = ["ImageEvent", "ImageStream"]


@dataclass(frozen=True)
class ImageEvent:
    """One image of a streamed request: a partial image (``partial`` = its 0-based index for image ``index``) or,
    with ``partial`` None, the final image."""

    index: int       # which of the request's n images
    image: bytes     # encoded in the request's output_format
    partial: int | None = None
    step: int = 0    # the denoising steps done when the preview was taken (the final image: all)


class ImageStream:
    """The previews and final images of one streamed request. ``hop(stage, work)`` runs one hop (the
    orchestrator's); ``on_event`` gets every :class:`ImageEvent`, on the event loop."""

    def __init__(self, req: GenerationRequest, deadline: float, on_event: Callable[[ImageEvent], None],
                 hop: Callable[[str, Work], Awaitable[Result]]) -> None:
        self.req = req.without_images()
        self.deadline = deadline
        self.on_event = on_event
        self.hop = hop
        self.token = secrets.token_hex(4)  # preview items' ids: a stage's remembered Cancel never hits a later request
        self.done: set[int] = set()
        self.shown: dict[int, int] = {}       # partial images delivered, per image
        self.last_step: dict[int, int] = {}   # the step of the last delivered partial, per image
        self.tasks: dict[int, set[asyncio.Task]] = {}
        self.closed = False

    def preview(self, msg: Preview) -> None:
        """A preview of image ``msg.index``: have it decoded (this stream now owns its tensor)."""
        if self.closed or msg.index in self.done:
            tensor_handoff.release(msg.output)
            return
        started: list[bool] = []
        task = asyncio.ensure_future(self._decode(msg, started))
        tasks = self.tasks.setdefault(msg.index, set())
        tasks.add(task)

        def done(t: asyncio.Task) -> None:
            tasks.discard(t)
            if not started:  # cancelled before its first line ran: nobody else releases the tensor
                tensor_handoff.release(msg.output)
        task.add_done_callback(done)

    async def _decode(self, msg: Preview, started: list[bool]) -> None:
        started.append(True)  # from here on the hop releases the tensor (or the VAE stage does)
        work = Work(req_id=f"{msg.req_id}.p{msg.index}.{self.token}", index=msg.step, seed=self.req.seed + msg.index,
                    params=self.req, inputs=msg.output, deadline=self.deadline, task=PREVIEW)
        try:
            res = await self.hop("vae", work)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the preview is lost; the request goes on (its final image says whether it failed)
            logger.info("preview %d/%d of %s/%d not decoded: %s", msg.step, msg.total, msg.req_id, msg.index, e)
            return
        i = msg.index
        if self.closed or i in self.done or msg.step <= self.last_step.get(i, 0) or res.image is None:
            return
        self.last_step[i] = msg.step
        k = self.shown[i] = self.shown.get(i, 0) + 1
        self.on_event(ImageEvent(i, res.image, k - 1, msg.step))

    def final(self, index: int, image: bytes) -> None:
        """Image ``index`` is done: its previews still in flight are cancelled, then its event."""
        self.done.add(index)
        for t in list(self.tasks.get(index, ())):
            t.cancel()
        self.on_event(ImageEvent(index, image, None, self.req.num_inference_steps))

    async def close(self) -> None:
        """The request ended (done, failed or cancelled): cancel every preview in flight and wait for them."""
        self.closed = True
        tasks = [t for ts in self.tasks.values() for t in ts]
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
