"""Liveness of the rank processes: is a rank still there, and is it still making progress?

A crashed rank is seen by the launcher (its process is gone). A *hung* one is not: a stopped or frozen process, a
collective that never completes, a stuck device or a dead file system under the model directory leave the process
alive. Two signals tell them apart, both judged by the frontend against ``[server] stall_timeout_s``:

- **heartbeats**: every rank process runs a thread (``runtime.stage_shell.Heartbeat``) that sends a
  :class:`~runtime.messages.Heartbeat` to the orchestrator's result channel every :func:`heartbeat_interval`. A
  stopped (SIGSTOP), frozen or swapped-out process sends none: silence for ``stall_timeout_s`` is a hang.
- **busy time**: each heartbeat carries how long the rank has been inside its current step or collective
  (:class:`Busy`, set by the compute path; waiting for work, for the driver's next decision or for the node's compute
  turn does not count). A step that runs past ``stall_timeout_s`` while the process still beats is a hang too (a
  deadlocked collective, a stuck device).

:class:`RankWatch` is the frontend's judge for one replica; the orchestrator asks it every health tick and fails a
hung replica like a crashed one (its processes SIGKILLed, which works on stopped processes too, and restarted).
Nothing here does I/O.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from omni_runtime.runtime.messages import Heartbeat

STARTUP_GRACE_S = 30.0
"""How much longer than ``stall_timeout_s`` a rank may stay silent until its replica is ready (announced Ready): a
process start on a loaded machine, and loading weights, where one long read may hold the GIL the heartbeat thread
needs."""


def heartbeat_interval(stall_timeout_s: float) -> float:
    """Seconds between two heartbeats of a rank: 8 per stall limit, at most 2 per second."""
    return max(0.02, min(0.5, stall_timeout_s / 8))


class Busy:
    """Since when this rank has been inside its current step or collective (``since`` 0.0: idle).

    The compute thread enters it (``with busy:``) around a step and marks each step boundary (:meth:`lap`); the
    heartbeat thread reads :meth:`seconds`. One float, written by one thread: no lock needed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.since = 0.0
        #: the rank's ``runtime.cores.ComputeToken`` (driver ranks under ``cpu_sharing = "exclusive"``), or None
        self.token: Any = None

    def waiting_for(self) -> str:
        """Who holds the node's compute turn while this rank waits for it; "" when it does not wait."""
        token = self.token
        if token is None or not token.waiting:
            return ""
        return token.holder() or "another stage"

    def __enter__(self) -> Busy:
        self.since = self.clock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.since = 0.0

    def lap(self) -> None:
        """A step boundary: the next step's time starts now (no-op while idle)."""
        if self.since:
            self.since = self.clock()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Waiting (for the driver's next decision, for the node's compute turn) is not busy time; the step after
        it starts when the wait ends."""
        was = self.since
        self.since = 0.0
        try:
            yield
        finally:
            if was:
                self.since = self.clock()

    def seconds(self) -> float:
        since = self.since
        return max(0.0, self.clock() - since) if since else 0.0


class RankWatch:
    """The frontend's view of one replica's heartbeats (``runtime.stage_client.ZmqStageClient``).

    :meth:`reset` at every (re)start, :meth:`loaded` once the replica announced Ready, :meth:`beat` for each heartbeat
    of the current generation, :meth:`hung` on every health tick. Until :meth:`loaded`, silence is allowed
    ``grace_s`` more. ``stall_timeout_s = 0`` turns the judgement off (heartbeats are still counted)."""

    def __init__(self, world_size: int, stall_timeout_s: float, *, grace_s: float = STARTUP_GRACE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.world_size, self.limit, self.grace, self.clock = world_size, stall_timeout_s, grace_s, clock
        self.generation = -1
        self.loading = True
        self.started = 0.0
        self.last: list[float | None] = [None] * world_size
        self.busy: list[float] = [0.0] * world_size
        self.waiting: list[str] = [""] * world_size
        self.beats = 0

    def reset(self, generation: int) -> None:
        self.generation = generation
        self.loading = True
        self.started = self.clock()
        self.last = [None] * self.world_size
        self.busy = [0.0] * self.world_size
        self.waiting = [""] * self.world_size

    def loaded(self) -> None:
        """The replica announced Ready: from now on ``stall_timeout_s`` alone."""
        self.loading = False

    def beat(self, msg: Heartbeat) -> bool:
        """Count a heartbeat; False (ignored) if it is from another generation or names no rank of the replica."""
        if msg.generation != self.generation or not 0 <= msg.rank < self.world_size:
            return False
        self.last[msg.rank] = self.clock()
        self.busy[msg.rank] = max(0.0, float(msg.busy_s))
        self.waiting[msg.rank] = msg.waiting_for[:100]
        self.beats += 1
        return True

    def forgive(self) -> None:
        """The frontend itself did not run for a while (its event loop was blocked): heartbeats that arrived late
        are its fault, not the ranks'. Every clock restarts now."""
        now = self.clock()
        self.last = [None if t is None else now for t in self.last]
        self.started = max(self.started, now - self.limit)

    def hung(self) -> tuple[int, str] | None:
        """(rank, why) of the first rank that is hung, or None. A rank that waits in a collective for a silent peer
        is not the culprit: when a step runs past the limit and another rank of the replica has been silent for
        several heartbeat intervals, that silent rank is named."""
        if self.limit <= 0 or self.generation < 0:
            return None
        now = self.clock()
        silence = self.limit + (self.grace if self.loading else 0.0)
        for rank, t in enumerate(self.last):
            if t is None:
                if now - self.started > self.limit + self.grace:
                    return rank, (f"sent no heartbeat in the {now - self.started:.1f}s since it started "
                                  f"(stall_timeout_s = {self.limit:g} + {self.grace:g}s to start)")
            elif now - t > silence:
                return rank, (f"sent no heartbeat for {now - t:.1f}s (stall_timeout_s = {self.limit:g}"
                              + (f" + {self.grace:g}s while loading" if self.loading else "")
                              + "): the process is stopped or frozen")
        for rank, t in enumerate(self.last):
            if t is None or not self.busy[rank] or self.busy[rank] + (now - t) <= self.limit:
                continue
            busy = self.busy[rank] + now - t
            quiet = [(now - q, r) for r, q in enumerate(self.last) if q is not None and r != rank]
            if quiet and max(quiet)[0] > 3 * heartbeat_interval(self.limit):
                silent_s, silent = max(quiet)
                return silent, (f"sent no heartbeat for {silent_s:.1f}s while rank {rank} waited {busy:.1f}s in "
                                f"one step or collective (stall_timeout_s = {self.limit:g})")
            own = now - t  # a stopped rank's last beat said "busy": its step is past the limit before its silence is
            stopped = (f"; it sent no heartbeat for {own:.1f}s: the process is stopped or frozen"
                       if own > 3 * heartbeat_interval(self.limit) else "")
            return rank, (f"has been in one step or collective for {busy:.1f}s (stall_timeout_s = {self.limit:g})"
                          + stopped)
        return None
