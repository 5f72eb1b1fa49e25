"""The part of a stage replica that is neither compute nor sockets: queueing, batching, cancellation and results.

A :class:`StageExecutor` wraps one engine (``stages.engine``). It is fed :class:`~runtime.messages.Work` and
:class:`~runtime.messages.Cancel` messages (``offer``), forms batches (same ``batch_key``, up to
``max_batch_size``; ``take_batch``: an idle stage dispatches a lone item at once, a batch is what arrived while the
stage was busy, topped up for at most ``batch_timeout_ms``, vLLM's way), runs a batch with a
stop hook that takes cancelled or expired items out between denoising steps (``run``) and turns the outputs into
:class:`~runtime.messages.Result` messages: tensors are published through ``runtime.tensor_handoff``, images are
encoded. ``runtime.driver_loop.DriverLoop`` is the driver's loop around it (and ``follow`` / ``follow_plan`` what
the other ranks of the replica do).

Inputs: ``offer`` fetches an item's input tensors (views) at once; the executor releases them when the item is
done (ran, failed or dropped). Every engine copies its inputs before computing, so a pooled producer may reuse
the segment after that release.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from omni_runtime.runtime import tensor_handoff
from omni_runtime.runtime.config import SCHEDULING
from omni_runtime.runtime.cores import ComputeToken
from omni_runtime.runtime.images import encode_image
from omni_runtime.runtime.liveness import Busy
from omni_runtime.runtime.messages import Cancel, Result, Work
from omni_runtime.runtime.peak_memory import PeakMemory
from omni_runtime.runtime.step_scheduler import Candidate, StepScheduler
from omni_runtime.stages.engine import PREVIEW, Engine, StageItem, StepEngine
from omni_runtime.stages.errors import OmniUserError

logger = logging.getLogger(__name__)

DROPPED = "cancelled or past its deadline"
MAX_REMEMBERED_CANCELS = 100_000


@dataclass
class Pending:
    """A Work the executor holds, with its inputs fetched and its batch key."""

    work: Work
    item: StageItem
    key: Hashable
    arrived: float = 0.0   # time.time() when the driver queued it
    started: float = 0.0   # time.time() when it joined a running set (step-level)
    tokens: int = 0        # image tokens per row in a step's forward (mixed sizes: the padding waste)
    rows: int = 1          # its rows (branches) in a step's forward
    peak_mb: float = 0.0   # the rank's peak memory over the steps it ran in (runtime.peak_memory)

    def candidate(self) -> Candidate:
        p = self.work.params
        return Candidate(key=self.key, pixels=p.width * p.height, priority=getattr(p, "priority", 0),
                         arrived=self.arrived, tokens=self.tokens, rows=self.rows)


def item_of(work: Work) -> StageItem:
    """The engine's item for a Work: the request, the image's seed and the fetched input tensors."""
    inputs = tensor_handoff.fetch(work.inputs) if work.inputs is not None else None
    return StageItem(params=work.params, seed=work.seed, inputs=inputs, task=work.task)


class StageExecutor:
    """Batches Work for one engine and runs it. Not thread-safe: one driver thread owns it."""

    def __init__(self, engine: Engine, stage: str, replica: int, *, max_batch_size: int, batch_timeout_ms: float,
                 publisher: tensor_handoff.Publisher | None = None, max_batch_pixels: int = 0,
                 scheduling: str = "request", priority_aging_s: float = 10.0,
                 max_padding_waste: float | None = None, token: ComputeToken | None = None,
                 busy: Busy | None = None, memory: PeakMemory | None = None) -> None:
        """``scheduling = "step"``: an engine with a running set (``run_step``, the denoiser) admits and retires
        items at every step boundary (:meth:`DriverLoop.step_loop`); ``"request"``, and every other engine: a
        batch runs from its first to its last step. ``max_padding_waste``: the engine runs mixed image sizes in
        one forward (``[stages.denoiser] mixed_sizes``) and a step's padding waste stays at most this. ``token``:
        the stages on this node take turns computing (``[placement] cpu_sharing``, ``runtime.cores``). ``busy``: the
        rank's step time, which its heartbeat reports (``runtime.liveness``). ``memory``: how this rank measures its
        peak memory per batch / step (``runtime.peak_memory``; default: the CPU process's)."""
        if scheduling not in SCHEDULING:
            raise ValueError(f"scheduling = {scheduling!r}: allowed values are {', '.join(map(repr, SCHEDULING))}")
        self.engine, self.stage, self.replica = engine, stage, replica
        #: the step-level admission policy, or None (request-level batches)
        self.scheduler = (StepScheduler(max_batch_size=max_batch_size, max_batch_pixels=max_batch_pixels,
                                        aging_s=priority_aging_s, max_padding_waste=max_padding_waste)
                          if scheduling == "step" and hasattr(engine, "run_step") else None)  # a StepEngine
        self.max_batch_size = max_batch_size
        self.max_batch_pixels = max_batch_pixels  # 0: no cap; else width x height summed over a batch
        self.batch_timeout_s = batch_timeout_ms / 1000  # the most a busy stage waits to top up a batch
        self.clock: Callable[[], float] = time.monotonic  # the batching window's clock (tests set a fake one)
        self.publisher = publisher or tensor_handoff.Publisher()
        self.pending: deque[Pending] = deque()
        self.cancelled: set[str] = set()
        self.token = token
        self.busy = busy or Busy()
        self.memory = memory or PeakMemory("cpu")

    def turn(self) -> contextlib.AbstractContextManager[object]:
        """The stage's turn to compute on the node's cores (at once when the stages do not take turns)."""
        return self.token if self.token is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ input

    def offer(self, msg: Work | Cancel) -> Result | None:
        """Take a Work (queued) or a Cancel (remembered). Returns a failure Result for a Work that cannot even be
        queued (its inputs cannot be fetched), to send back at once."""
        if isinstance(msg, Cancel):
            self.cancelled.add(msg.req_id)
            if len(self.cancelled) > MAX_REMEMBERED_CANCELS:
                self.cancelled.clear()
            return None
        try:
            item = item_of(msg)
            step_engine = cast(StepEngine, self.engine)  # a scheduler only for a StepEngine
            key = step_engine.join_key(item) if self.scheduler is not None else self.engine.batch_key(item)
            tokens, rows = 0, 1
            if self.scheduler is not None and self.scheduler.max_padding_waste is not None:
                tokens, rows = step_engine.row_tokens(item)
        except Exception as e:  # a stale/forged ref or inputs that do not fit: this item fails, the stage goes on
            logger.error("%s: cannot queue item %s/%d: %s", self.stage, msg.req_id, msg.index, e)
            self._release(msg)
            return self._result(msg, ok=False, error=f"{type(e).__name__}: {e}")
        self.pending.append(Pending(msg, item, key, arrived=time.time(), tokens=tokens, rows=rows))
        return None

    def take_batch(self, wait: Callable[[float], None], busy: bool = False) -> list[Pending]:
        """The next batch: the items with the first pending item's key, up to ``batch_limit``.

        ``wait(seconds)`` takes in what arrives (it should ``offer`` it); ``wait(0)`` first takes in what has
        already arrived. An idle stage (``busy=False``: the first pending item arrived while nothing ran)
        dispatches at once, a lone item too: no batching window delays it. A busy stage (``busy=True``: the
        driver comes straight from running a batch, so these items queued while it ran) takes what queued and,
        when that is short of the limit, waits at most ``batch_timeout_ms`` for more (0, the default: never).
        Previews (``Work.task == "preview"``, streamed partial images) go last: a preview batch runs only when no
        other item waits, so a preview never delays a final image that was already queued."""
        wait(0)
        lead = next((p for p in self.pending if p.work.task != PREVIEW), self.pending[0])
        key = lead.key
        limit = self.batch_limit(lead.work)
        window = self.batch_timeout_s if busy else 0.0
        window_end = self.clock() + window
        while window > 0:
            same = sum(1 for p in self.pending if p.key == key)
            left = window_end - self.clock()
            if same >= limit or left <= 0:
                break
            wait(left)
        batch: list[Pending] = []
        rest: deque[Pending] = deque()
        for p in self.pending:
            if len(batch) < limit and p.key == key:
                batch.append(p)
            else:
                rest.append(p)
        self.pending = rest
        return batch

    def batch_limit(self, w: Work) -> int:
        """Items of ``w``'s batch key per batch: ``max_batch_size``, and with ``max_batch_pixels`` no more images of
        ``w``'s size than fit under it (the denoiser's and the VAE's batch keys include the size; one image always
        runs: a request over the cap was refused at the edge)."""
        if not self.max_batch_pixels:
            return self.max_batch_size
        pixels = w.params.width * w.params.height
        return max(1, min(self.max_batch_size, self.max_batch_pixels // pixels))

    def is_dropped(self, w: Work, now: float | None = None) -> bool:
        """Cancelled by the orchestrator, or past its deadline."""
        now = time.time() if now is None else now
        return w.req_id in self.cancelled or bool(w.deadline and now > w.deadline)

    def drop_dead(self, batch: list[Pending]) -> tuple[list[Pending], list[Result]]:
        """Split a batch into the items to run and failure Results for those already cancelled or expired."""
        now = time.time()
        alive, gone = [], []
        for p in batch:
            (gone if self.is_dropped(p.work, now) else alive).append(p)
        return alive, [self._fail(p.work, DROPPED) for p in gone]

    def drop_all(self, reason: str) -> list[Result]:
        """Fail every queued item (shutdown)."""
        out = [self._fail(p.work, reason) for p in self.pending]
        self.pending.clear()
        return out

    def stop_now(self, batch: Sequence[Pending]) -> list[int]:
        """Indices of the batch's items that must leave it now."""
        now = time.time()
        return [i for i, p in enumerate(batch) if self.is_dropped(p.work, now)]

    # ------------------------------------------------------------------ running

    def run(self, batch: list[Pending], stop: Callable[[int], Sequence[int]] | None = None,
            announce: Callable[[], None] | None = None) -> list[Result]:
        """Run ``batch`` on the engine (``stop``: the per-step hook) in the stage's :meth:`turn`, publish the
        outputs, release the inputs; one Result per item, in order. ``announce`` is called once the turn is the
        stage's, before computing (the driver broadcasts the batch to its followers)."""
        err, user = "", False
        with self.turn(), self.busy:
            if announce is not None:
                announce()
            t0 = time.time()
            self.memory.reset()
            try:
                outs = self.engine.step([p.item for p in batch], stop=stop)
            except Exception as e:
                user = isinstance(e, OmniUserError)
                if not user:
                    logger.exception("%s: batch of %d failed", self.stage, len(batch))
                outs, err = [None] * len(batch), f"{type(e).__name__}: {e}"
            dt = time.time() - t0
            peak = self.memory.read_mb()
        results = []
        for i, (p, out) in enumerate(zip(batch, outs, strict=True)):
            w = p.work
            p.item.inputs = None
            self._release(w)
            if err:
                res = self._result(w, ok=False, error=err, user_error=user)
            elif out is None:
                res = self._result(w, ok=False, error=DROPPED)
            else:
                res = self._result(w)
                try:
                    self._attach(res, out, w)
                except Exception as e:
                    logger.exception("%s: cannot hand on the output of %s/%d", self.stage, w.req_id, w.index)
                    res = self._result(w, ok=False, error=f"{type(e).__name__}: {e}")
            res.batch_size, res.first_in_batch = len(batch), i == 0
            res.queue_s, res.compute_s = max(0.0, t0 - w.sent_at), dt
            res.peak_memory_mb = peak
            results.append(res)
        return results

    def finish(self, p: Pending, out: Any, error: str = "", user_error: bool = False) -> Result:
        """The Result of one item of a running set (step-level): its output published, or the error (``out`` None
        and no error: it was dropped); its inputs released."""
        w = p.work
        p.item.inputs = None
        self._release(w)
        if error:
            return self._result(w, ok=False, error=error, user_error=user_error)
        if out is None:
            return self._result(w, ok=False, error=DROPPED)
        res = self._result(w)
        try:
            self._attach(res, out, w)
        except Exception as e:
            logger.exception("%s: cannot hand on the output of %s/%d", self.stage, w.req_id, w.index)
            return self._result(w, ok=False, error=f"{type(e).__name__}: {e}")
        res.queue_s, res.compute_s = max(0.0, p.started - w.sent_at), time.time() - p.started
        res.peak_memory_mb = p.peak_mb
        return res

    def _attach(self, res: Result, out: Any, w: Work) -> None:
        if isinstance(out, np.ndarray):  # the last stage: an image
            res.image = encode_image(out, w.params.output_format)
        else:
            res.output = self.publisher.publish(out)

    # ------------------------------------------------------------------ helpers

    def _release(self, w: Work) -> None:
        if w.inputs is not None:
            try:
                tensor_handoff.release(w.inputs)
            except Exception as e:  # a forged ref: nothing of ours to free
                logger.warning("%s: could not release the inputs of %s/%d: %s", self.stage, w.req_id, w.index, e)

    def _result(self, w: Work, ok: bool = True, error: str = "", user_error: bool = False) -> Result:
        return Result(req_id=w.req_id, index=w.index, stage=self.stage, replica=self.replica, ok=ok, error=error,
                      user_error=user_error)

    def _fail(self, w: Work, reason: str) -> Result:
        self._release(w)
        return self._result(w, ok=False, error=reason)

    def close(self) -> None:
        self.publisher.close()
        if self.token is not None:
            self.token.close()
