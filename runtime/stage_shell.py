"""The process shell of a stage replica: everything a rank does besides computing.

Driver (rank 0): pulls :class:`~runtime.messages.Work` / ``Cancel`` / ``Stop`` from its input channel, lets the
:class:`~runtime.stage_exec.StageExecutor` batch and run them, and pushes one :class:`~runtime.messages.Result`
per item to the orchestrator's result channel. It announces :class:`~runtime.messages.Ready` first (the readiness
handshake). Before every denoising step it takes in what arrived (a ``Cancel`` among it), decides which items
leave the batch (cancelled or expired) and broadcasts that :class:`~runtime.messages.StepDecision` to the other
ranks, so every rank takes the same items out.

Followers (rank > 0): receive each :class:`~runtime.messages.Batch` (and the step decisions) through the
:class:`~runtime.rank_fanout.RankFanout` and run the same engine step, so their collectives pair up. Under
step-level scheduling there are no batches: each step plan (a ``StepDecision`` with ``plan``: drops and admissions)
is applied to the follower's running set, then it runs the same step (``driver_loop.follow_plan``).

Every rank (driver and followers) runs a :class:`Heartbeat` thread that tells the orchestrator it is alive and how
long it has been in its current step (``runtime.liveness``).

Channels come from ``comm.channel`` (the one socket factory); tensors only through ``runtime.tensor_handoff``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

from omni_runtime.comm import serde
from omni_runtime.comm.channel import ChannelTimeout, SyncReceiver, SyncSender
from omni_runtime.comm.shm_broadcast import MessageQueueCancelled
from omni_runtime.runtime.driver_loop import DriverLoop, follow, follow_plan
from omni_runtime.runtime.liveness import Busy
from omni_runtime.runtime.messages import Heartbeat as HeartbeatMsg
from omni_runtime.runtime.messages import Inbound, Ready, Result, StepDecision, StepReport, Stop
from omni_runtime.runtime.rank_fanout import RankFanout
from omni_runtime.runtime.stage_exec import StageExecutor
from omni_runtime.stages.engine import Engine

logger = logging.getLogger(__name__)

HWM = 100_000


class Driver(DriverLoop):
    """Rank 0 of a replica: the driver loop over ZMQ channels. ``run()`` until a ``Stop`` arrives."""

    def __init__(self, executor: StageExecutor, fanout: RankFanout, in_addr: str, out_addr: str) -> None:
        super().__init__(executor, fanout.send if fanout.has_followers else None)
        self.fanout = fanout
        self.inbox = SyncReceiver(in_addr, rcvhwm=HWM)
        self.outbox = SyncSender(out_addr, sndhwm=HWM)

    def send(self, msg: Ready | Result | StepReport) -> None:
        self.outbox.send(msg)

    def _take_frames(self, frames: list) -> None:
        try:
            msg = serde.decode(frames, Inbound)
        except serde.SerdeError as e:
            logger.error("dropped an undecodable message: %s", e)
            return
        self.take(msg)

    def receive(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a message, then take in every message already there."""
        try:
            self._take_frames(self.inbox.recv_frames(timeout=max(0.0, timeout_s)))
        except ChannelTimeout:
            return
        while True:
            try:
                self._take_frames(self.inbox.recv_frames(timeout=0))
            except ChannelTimeout:
                return

    def run(self) -> None:
        ex = self.executor
        self.send(Ready(stage=ex.stage, replica=ex.replica, pids=[os.getpid()]))
        self.loop()

    def close(self) -> None:
        self.inbox.close()
        self.outbox.close(linger=2.0)


class Heartbeat:
    """A daemon thread of a rank process that sends a :class:`~runtime.messages.Heartbeat` (with the rank's
    :class:`~runtime.liveness.Busy` time) to the orchestrator's result channel every ``interval_s``, on a socket of
    its own. A beat the channel cannot take at once is dropped: a late frontend must not block the rank."""

    def __init__(self, out_addr: str, msg: HeartbeatMsg, busy: Busy, interval_s: float) -> None:
        self.out_addr, self.msg, self.busy, self.interval_s = out_addr, msg, busy, interval_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="omni-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.thread.start()
        return self

    def _run(self) -> None:
        sender = SyncSender(self.out_addr, sndhwm=4)
        try:
            while True:
                self.msg.busy_s = self.busy.seconds()
                self.msg.waiting_for = self.busy.waiting_for()
                try:
                    sender.send(self.msg, timeout=0)
                except ChannelTimeout:
                    pass
                if self._stop.wait(self.interval_s):
                    return
        except Exception:  # the rank goes on; the frontend will see it silent and restart the replica
            logger.exception("the heartbeat thread failed")
        finally:
            sender.close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


class _Interrupted(Exception):
    """A follower expected a step decision and got the next batch (the driver's batch failed mid-way)."""

    def __init__(self, msg: object) -> None:
        super().__init__("the driver moved on")
        self.msg = msg


def follow_loop(engine: Engine, fanout: RankFanout, busy: Busy | None = None) -> None:
    """A follower rank: run every batch the driver broadcasts, until ``Stop`` or the driver is gone. ``busy``: the
    rank's step time, which its heartbeat reports (waiting for the driver does not count)."""
    stash = None
    busy = busy or Busy()

    def stop(step: int) -> Sequence[int]:
        with busy.paused():
            msg = fanout.recv()
        if not isinstance(msg, StepDecision):
            raise _Interrupted(msg)
        return msg.drop

    while True:
        if stash is not None:
            msg, stash = stash, None
        else:
            try:
                msg = fanout.recv()
            except MessageQueueCancelled:
                logger.info("the driver is gone; exiting")
                return
        if isinstance(msg, Stop):
            return
        if isinstance(msg, StepDecision):
            if msg.plan:  # step-level scheduling: the plan of the next step of the running set
                try:
                    with busy:
                        follow_plan(engine, msg)
                except MessageQueueCancelled:
                    logger.info("the driver is gone; exiting")
                    return
                except Exception:  # the driver's step failed too: it drops the running set with its next plan
                    logger.exception("a step failed on a follower rank")
            continue  # else left over from a batch this rank failed
        try:
            with busy:
                follow(engine, msg.items, stop)
        except _Interrupted as e:
            stash = e.msg
        except MessageQueueCancelled:
            logger.info("the driver is gone; exiting")
            return
        except Exception:
            logger.exception("batch of %d failed on a follower rank", len(msg.items))
