"""The driver rank's loop around a :class:`~runtime.stage_exec.StageExecutor`, and what its follower ranks do.

:class:`DriverLoop` takes messages in, batches, runs each batch with the per-step stop hook and sends the
:class:`~runtime.messages.Result` messages; with step-level scheduling (``executor.scheduler``) it runs the running
set one step at a time, retiring and admitting items at every step boundary. Its I/O is left abstract: the process
shell (``runtime.stage_shell``) fills it with channels, the in-process client (``runtime.stage_client``) with a queue,
so a stage behaves the same in both. A replica's other ranks mirror the driver: :func:`follow` runs a broadcast
batch, :func:`follow_plan` applies a broadcast step plan and runs the same step.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

from omni_runtime.runtime.messages import (
    Admit,
    Batch,
    Cancel,
    ItemProgress,
    Preview,
    RankMessage,
    Result,
    StepDecision,
    StepReport,
    Stop,
    Work,
)
from omni_runtime.runtime.stage_exec import Pending, StageExecutor, item_of
from omni_runtime.stages.engine import Engine, StepEngine
from omni_runtime.stages.errors import OmniUserError

logger = logging.getLogger(__name__)


def follow(engine: Engine, works: list[Work], stop: Callable[[int], Sequence[int]] | None) -> None:
    """What a follower rank does with a batch its driver broadcast: the same compute (its collectives pair up
    with the driver's), outputs discarded. The driver releases the inputs."""
    engine.step([item_of(w) for w in works], stop=stop)


class DriverLoop:
    """The driver of a replica: take messages in, batch, run with the per-step stop hook, send Results.

    Subclasses provide :meth:`receive` (wait up to ``timeout_s`` for messages and :meth:`take` each) and
    :meth:`send`; ``broadcast`` (the driver -> followers fan-out) gets every batch and every step decision when
    the replica has other ranks."""

    idle_poll_s = 0.5

    def __init__(self, executor: StageExecutor, broadcast: Callable[[RankMessage], None] | None = None) -> None:
        self.executor = executor
        self.broadcast = broadcast
        self.stopping = False

    def receive(self, timeout_s: float) -> None:
        raise NotImplementedError

    def send(self, res: Result) -> None:
        raise NotImplementedError

    def take(self, msg: Work | Cancel | Stop) -> None:
        if isinstance(msg, Stop):
            self.stopping = True
            return
        failed = self.executor.offer(msg)
        if failed is not None:
            self.send(failed)

    def _stop_hook(self, batch: list[Pending]) -> Callable[[int], Sequence[int]]:
        gone: set[int] = set()
        last = [time.time()]

        def stop(step: int) -> Sequence[int]:
            self.executor.busy.lap()  # a step boundary: the rank's heartbeat times each step on its own
            if step and self.executor.token is not None:
                with self.executor.busy.paused():  # waiting for the node's turn is not a stalled step
                    self.executor.token.hand_over()  # stages waiting to compute go before the next step
            if step:  # progress and step metrics of the step just done (the denoiser's batches)
                now = time.time()
                self.send(StepReport(stage=self.executor.stage, replica=self.executor.replica,
                                     step_s=now - last[0], active=len(batch) - len(gone), progress=[
                                         ItemProgress(p.work.req_id, p.work.index, step, p.work.params.num_inference_steps)
                                         for i, p in enumerate(batch) if i not in gone]))
                last[0] = now
            self.receive(0)  # a Cancel may have arrived since the last step
            # on Stop (shutdown) the orchestrator has already failed every item: end the batch now
            now = range(len(batch)) if self.stopping else self.executor.stop_now(batch)
            drop = [i for i in now if i not in gone]
            gone.update(drop)
            if self.broadcast is not None:
                self.broadcast(StepDecision(drop=drop))
            if drop:
                logger.info("%s step %d: %d item(s) leave the running batch (cancelled or past the deadline)",
                            self.executor.stage, step, len(drop))
            return drop
        return stop

    def loop(self) -> None:
        """Run until a ``Stop`` arrives; then fail what is still queued."""
        ex = self.executor
        if ex.scheduler is not None:
            self.step_loop()
            return
        busy = False  # True right after a batch ran: what is pending queued while the stage was busy
        while not self.stopping:
            if not ex.pending:
                busy = False
                self.receive(self.idle_poll_s)
                continue
            batch, dropped = ex.drop_dead(ex.take_batch(self.receive, busy=busy))
            for res in dropped:
                self.send(res)
            if not batch:
                continue
            announce = None
            if self.broadcast is not None:
                announce = lambda batch=batch: self.broadcast(Batch(items=[p.work for p in batch]))  # noqa: E731
            for res in ex.run(batch, stop=self._stop_hook(batch), announce=announce):
                self.send(res)
            busy = True
        self._shut_down("driver loop")

    def _shut_down(self, loop: str) -> None:
        """After ``Stop``: fail what is still queued, stop the followers."""
        ex = self.executor
        for res in ex.drop_all("the stage is shutting down"):
            self.send(res)
        if self.broadcast is not None:
            self.broadcast(Stop())
        logger.debug("%s of %s[%d] (pid %d) ended", loop, ex.stage, ex.replica, os.getpid())

    # ------------------------------------------------------------------ step-level scheduling

    def step_loop(self) -> None:
        """Step-level scheduling (``executor.scheduler``): at every step boundary retire the cancelled and expired
        items, admit waiting ones (the scheduler's policy), broadcast that plan, run one step of the running set and
        answer the items that finished. Runs until a ``Stop`` arrives; then fails what is running or queued."""
        ex = self.executor
        assert ex.scheduler is not None
        running: dict[int, Pending] = {}
        failed: list[int] = []  # slots a failed step left on the other ranks: dropped with the next plan
        next_slot = step = 0
        while not self.stopping:
            if not running and not ex.pending:
                self.receive(self.idle_poll_s)
                continue
            self.receive(0)  # Work and Cancel that arrived during the last step
            if self.stopping:
                break
            now = time.time()
            drop = self._retire_dropped(running, step, now)
            admit = self._choose_admissions(running, next_slot, now)
            next_slot += len(admit)
            with ex.turn(), ex.busy:  # the stages on this node may take turns on its cores (runtime.cores)
                if self.broadcast is not None and (drop or failed or admit or running):
                    self.broadcast(StepDecision(drop=drop + failed, admit=[Admit(s, p.work) for s, p in admit],
                                                plan=True))
                failed = []
                ex.memory.reset()  # the peak of this step (admission included) goes to every item in it
                self._admit(admit, running, now)
                if not running:
                    continue
                active = len(running)
                t0 = time.time()
                outs = self._run_step(running)
                if outs is None:  # the step failed: every running item failed with it
                    failed = list(running)
                    running.clear()
                    continue
                dt = time.time() - t0
                peak = ex.memory.read_mb()
                for p in running.values():
                    p.peak_mb = max(p.peak_mb, peak)
            step += 1
            self._send_previews(running)
            self._answer_step(running, outs, StepReport(stage=ex.stage, replica=ex.replica, step_s=dt, active=active,
                                                        admitted=len(admit), retired=len(drop) + len(outs)))
        for p in running.values():
            self.send(ex.finish(p, None, "the stage is shutting down"))
        self._shut_down("step loop")

    def _step_engine(self) -> StepEngine:
        return cast(StepEngine, self.executor.engine)  # the executor has a scheduler only for a StepEngine

    def _retire_dropped(self, running: dict[int, Pending], step: int, now: float) -> list[int]:
        """Take the cancelled and expired items out of the running set (answered as dropped); their slots."""
        ex, engine = self.executor, self._step_engine()
        drop = [s for s, p in running.items() if ex.is_dropped(p.work, now)]
        for s in drop:
            engine.drop(s)
            self.send(ex.finish(running.pop(s), None))
        if drop:
            logger.info("%s step %d: %d item(s) leave the running batch (cancelled or past the deadline)",
                        ex.stage, step, len(drop))
        return drop

    def _choose_admissions(self, running: dict[int, Pending], next_slot: int,
                           now: float) -> list[tuple[int, Pending]]:
        """The waiting items the scheduler admits at this step, in arrival order, with their new slots (from
        ``next_slot``); the dead ones are answered, the others stay pending."""
        ex = self.executor
        assert ex.scheduler is not None
        alive, dead = ex.drop_dead(list(ex.pending))
        for res in dead:
            self.send(res)
        chosen = set(ex.scheduler.admit([p.candidate() for p in alive], [p.candidate() for p in running.values()],
                                        now))
        ex.pending = deque(p for i, p in enumerate(alive) if i not in chosen)
        return [(next_slot + k, alive[i]) for k, i in enumerate(sorted(chosen, key=lambda i: alive[i].arrived))]

    def _admit(self, admit: list[tuple[int, Pending]], running: dict[int, Pending], now: float) -> None:
        """Admit into the running set; an item the model cannot run (e.g. an image size) fails alone."""
        ex, engine = self.executor, self._step_engine()
        for s, p in admit:
            try:
                engine.admit(s, p.item)
            except Exception as e:
                user = isinstance(e, OmniUserError)
                if not user:
                    logger.exception("%s: cannot admit %s/%d", ex.stage, p.work.req_id, p.work.index)
                self.send(ex.finish(p, None, f"{type(e).__name__}: {e}", user_error=user))
                continue
            p.started = now
            running[s] = p

    def _run_step(self, running: dict[int, Pending]) -> dict[int, Any] | None:
        """One step of the running set: the outputs of the items that finished, or None when the step raised (then
        every running item is answered as failed and left the engine's running set)."""
        ex, engine = self.executor, self._step_engine()
        try:
            return engine.run_step()
        except Exception as e:
            logger.exception("%s: a step of %d item(s) failed", ex.stage, len(running))
            for s, p in running.items():
                engine.drop(s)
                self.send(ex.finish(p, None, f"{type(e).__name__}: {e}"))
            return None

    def _answer_step(self, running: dict[int, Pending], outs: dict[int, Any], report: StepReport) -> None:
        """Answer the items the step finished and send the step's report (with every item's progress)."""
        ex, engine = self.executor, self._step_engine()
        progress = []
        for j, (s, out) in enumerate(outs.items()):
            p = running.pop(s)
            total = p.work.params.num_inference_steps
            progress.append(ItemProgress(p.work.req_id, p.work.index, total, total))
            res = ex.finish(p, out)
            res.cache = engine.cache_stats(s)
            # omni_batch_size: the items of the last step, once per step that finished any
            res.batch_size, res.first_in_batch = report.active, j == 0
            self.send(res)
        progress += [ItemProgress(p.work.req_id, p.work.index, *engine.progress(s)) for s, p in running.items()]
        report.progress, report.padding_waste = progress, engine.padding_waste
        self.send(report)

    def _send_previews(self, running: dict[int, Pending]) -> None:
        """The predicted clean latents the last step kept for streamed requests (``partial_images``), published and
        sent to the orchestrator, which has them decoded and streams them (a failure costs the preview only)."""
        ex = self.executor
        for s, (done, x0) in self._step_engine().take_previews().items():
            p = running.get(s)
            if p is None:
                continue
            try:
                ref = ex.publisher.publish(x0)
            except Exception as e:
                logger.warning("%s: preview of %s/%d not published: %s", ex.stage, p.work.req_id, p.work.index, e)
                continue
            self.send(Preview(stage=ex.stage, replica=ex.replica, req_id=p.work.req_id, index=p.work.index,
                              step=done, total=p.work.params.num_inference_steps, output=ref))


def follow_plan(engine: StepEngine, plan: StepDecision) -> None:
    """What a follower rank does with a step plan its driver broadcast (step-level scheduling): the same drops and
    admissions, then the same step of the running set (its collectives pair up with the driver's)."""
    for s in plan.drop:
        engine.drop(s)
    for a in plan.admit:
        try:
            engine.admit(a.slot, item_of(a.work))
        except Exception as e:  # the driver failed it too (the same validation)
            logger.debug("follower: item %s/%d not admitted: %s", a.work.req_id, a.work.index, e)
    if len(engine.running):
        engine.run_step()
