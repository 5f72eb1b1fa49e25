"""How the orchestrator reaches one stage replica: a :class:`StageClient`.

A client takes :class:`~runtime.messages.Work` (``await submit(work)`` returns a future that resolves to the
item's :class:`~runtime.messages.Result`), takes it back (``await cancel(work)``), and says whether the replica is
``ready``, whether it is ``dead()`` and whether it is ``hung()`` (its ranks' heartbeats, ``runtime.liveness``).
Two kinds:

- :class:`ZmqStageClient`: a replica of rank processes (``runtime.launcher``), work over a ``comm.channel``
  PUSH channel; results come back through the one :class:`ResultListener` of the frontend, which routes each
  ``Ready``/``Result`` to its client and survives any message it receives.
- :class:`InProcessStageClient`: the same engine and the same driver loop (``runtime.driver_loop``) on a thread
  of this process (``Omni(in_process=True)``, tests).

:func:`zmq_stages` and :func:`in_process_stages` build every client of a config as a :class:`StageSet`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

from omni_runtime.comm import serde
from omni_runtime.comm.channel import ChannelClosed, Receiver, Sender
from omni_runtime.runtime import tensor_handoff
from omni_runtime.runtime.config import STAGE_NAMES, RuntimeConfig
from omni_runtime.runtime.driver_loop import DriverLoop
from omni_runtime.runtime.liveness import RankWatch
from omni_runtime.runtime.messages import (
    Cancel,
    Heartbeat,
    Outbound,
    Preview,
    Ready,
    Result,
    StepReport,
    Stop,
    Work,
)
from omni_runtime.runtime.stage_exec import StageExecutor

logger = logging.getLogger(__name__)

HWM = 100_000


class WatchedClient(Protocol):
    """What the orchestrator's health tick (``Orchestrator._watch``) asks of every replica."""

    def dead(self) -> tuple[int, int | None] | None: ...   # (rank, exit code) of a gone rank, or None

    def hung(self) -> tuple[int, str] | None: ...          # (rank, why) of a hung rank, or None

    def forgive(self) -> None:
        """This process did not run for a while (its event loop was blocked): heartbeats that arrived late are not
        the ranks' fault (``runtime.liveness.RankWatch.forgive``). A replica without heartbeats does nothing."""
        ...


class StageClient(WatchedClient, Protocol):
    stage: str
    replica: int
    ready: bool                 # accepting work (announced Ready, not restarting)
    outstanding: int            # items submitted and not yet answered
    generation: int             # 1 for the first start, +1 per restart
    restartable: bool
    on_ready: Callable[[StageClient], None] | None
    on_report: Callable[[StepReport], None] | None

    @property
    def label(self) -> str: ...

    async def start(self) -> None: ...

    async def submit(self, work: Work) -> asyncio.Future: ...

    async def cancel(self, work: Work) -> None: ...

    def fail_inflight(self, exc: BaseException) -> None: ...

    async def restart(self, delay: float) -> None: ...

    async def stop(self) -> None: ...                      # ask it to finish (graceful); close() after

    def close(self) -> None: ...


class _Futures:
    """The items in flight on one client, by (req_id, index)."""

    def __init__(self) -> None:
        self.inflight: dict[tuple[str, int], asyncio.Future] = {}
        self.outstanding = 0
        #: called with each :class:`~runtime.messages.StepReport` of the replica (the orchestrator's progress)
        self.on_report: Callable[[StepReport], None] | None = None
        #: called with each :class:`~runtime.messages.Preview` (a streamed request's partial image to decode); it
        #: then owns the preview's tensor; without it the tensor is released at once
        self.on_preview: Callable[[Preview], None] | None = None

    def report(self, msg: StepReport) -> None:
        if self.on_report is not None:
            self.on_report(msg)

    def deliver(self, msg: Result | StepReport | Preview) -> None:
        """A Result resolves its future; a StepReport goes to ``on_report``, a Preview to ``on_preview``."""
        if isinstance(msg, StepReport):
            self.report(msg)
        elif isinstance(msg, Preview):
            if self.on_preview is not None:
                self.on_preview(msg)
            else:
                tensor_handoff.release(msg.output)
        else:
            self.resolve(msg)

    def add(self, work: Work) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.inflight[(work.req_id, work.index)] = fut
        self.outstanding += 1
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _: asyncio.Future) -> None:
        self.outstanding -= 1

    def forget(self, work: Work) -> bool:
        """Stop waiting for ``work``; True if it was still awaited."""
        fut = self.inflight.pop((work.req_id, work.index), None)
        if fut is None:
            return False
        if not fut.done():
            fut.cancel()
        return True

    def resolve(self, res: Result) -> None:
        fut = self.inflight.pop((res.req_id, res.index), None)
        if fut is None or fut.done():
            if res.output is not None:  # nobody waits for it any more (cancelled, timed out)
                tensor_handoff.release(res.output)
            return
        fut.set_result(res)

    def fail(self, exc: BaseException) -> None:
        for fut in self.inflight.values():
            if not fut.done():
                fut.set_exception(exc)
        self.inflight.clear()


# ------------------------------------------------------------------------------------------------ processes


class ZmqStageClient(_Futures):
    """One replica of rank processes. ``procs`` is the launcher's handle on them (start/kill/dead_rank)."""

    restartable = True

    def __init__(self, procs: Any, stall_timeout_s: float = 0.0) -> None:
        super().__init__()
        self.procs = procs
        self.stage, self.replica = procs.stage, procs.replica
        self.ready = False
        self.on_ready: Callable[[StageClient], None] | None = None
        self.sender: Sender | None = None
        self.restarts = 0
        self.killing = False  # between a failure and the end of the kill (a hung replica is still "hung")
        #: the heartbeats of its ranks (``runtime.liveness``)
        place = getattr(procs, "place", None)
        self.watch = RankWatch(place.world_size if place is not None else 1, stall_timeout_s)

    @property
    def label(self) -> str:
        return self.procs.label

    @property
    def generation(self) -> int:
        return self.procs.generation

    async def start(self) -> None:
        self.ready = False
        if self.sender is not None:
            self.sender.close()
        await asyncio.to_thread(self.procs.start)  # a Ray launcher waits for its actors: not on the loop
        self.watch.reset(self.generation)
        self.sender = Sender(self.procs.in_addr, sndhwm=HWM)

    def dead(self) -> tuple[int, int | None] | None:
        return self.procs.dead_rank()

    def beat(self, msg: Heartbeat) -> None:
        self.watch.beat(msg)

    def hung(self) -> tuple[int, str] | None:
        return self.watch.hung() if self.sender is not None else None

    def forgive(self) -> None:
        self.watch.forgive()

    def waiting_for(self) -> str:
        """Who holds the node's compute turn that the driver waits for (its last heartbeat); "" if it does not."""
        return self.watch.waiting[0] if self.watch.waiting else ""

    def rank_node(self, rank: int) -> str:
        return self.procs.rank_node(rank)

    def announce_ready(self) -> None:
        self.ready = True
        self.watch.loaded()
        logger.info("%s ready (generation %d)", self.label, self.generation)
        if self.on_ready is not None:
            self.on_ready(self)

    async def submit(self, work: Work) -> asyncio.Future:
        fut = self.add(work)
        try:
            await self.sender.send(work)
        except BaseException:
            self.forget(work)
            raise
        return fut

    async def cancel(self, work: Work) -> None:
        if self.forget(work) and self.sender is not None and not self.sender.closed:
            with contextlib.suppress(Exception):
                await self.sender.send(Cancel(work.req_id))

    def fail_inflight(self, exc: BaseException) -> None:
        self.fail(exc)

    async def restart(self, delay: float) -> None:
        self.ready = False
        self.killing = True
        try:
            await asyncio.to_thread(self.procs.kill)  # SIGKILL: a stopped (hung) process dies too
        finally:
            self.killing = False
        if delay:
            logger.warning("%s keeps dying while starting; restarting in %.0fs", self.label, delay)
            await asyncio.sleep(delay)
        self.restarts += 1
        await self.start()

    async def stop(self) -> None:
        if self.sender is not None and not self.sender.closed:
            with contextlib.suppress(Exception):
                await self.sender.send(Stop(), timeout=1.0)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()


class ResultListener:
    """The frontend's one result channel: routes each ``Ready``/``Result`` to its client. A message it cannot
    decode, or one naming a stage or replica it does not know, is logged and ignored; ``run()`` ends only when
    cancelled or when the channel is closed."""

    def __init__(self, addr: str, clients: dict[str, list[ZmqStageClient]]) -> None:
        self.clients = clients
        self.receiver = Receiver(addr, rcvhwm=HWM)
        self.ignored = 0

    def _client(self, msg: Ready | Result) -> ZmqStageClient | None:
        reps = self.clients.get(msg.stage)
        if reps is None or not 0 <= msg.replica < len(reps):
            return None
        return reps[msg.replica]

    def handle(self, frames: list) -> None:
        """Route one message (any exception is the message's fault: logged, never raised)."""
        try:
            msg = serde.decode(frames, Outbound)
            client = self._client(msg)
            if client is None:
                self.ignored += 1
                logger.warning("ignored a %s for stage=%r replica=%r: no such stage replica",
                               type(msg).__name__, msg.stage, msg.replica)
            elif isinstance(msg, Heartbeat):
                client.beat(msg)
            elif isinstance(msg, Ready):
                client.announce_ready()
            else:
                client.deliver(msg)
        except serde.SerdeError as e:
            self.ignored += 1
            logger.error("dropped an undecodable result message: %s", e)
        except Exception:
            self.ignored += 1
            logger.exception("ignored a result message that could not be handled")

    async def run(self) -> None:
        while True:
            try:
                frames = await self.receiver.recv_frames()
            except ChannelClosed:
                return
            self.handle(frames)

    def close(self) -> None:
        self.receiver.close()


# ------------------------------------------------------------------------------------------------ in process


class _QueueDriver(DriverLoop):
    """The driver loop fed from a ``queue.Queue``; results go to the event loop's thread."""

    def __init__(self, executor: StageExecutor, inbox: queue.Queue,
                 deliver: Callable[[Result | StepReport], None]) -> None:
        super().__init__(executor)
        self.inbox, self.deliver = inbox, deliver

    def receive(self, timeout_s: float) -> None:
        try:
            self.take(self.inbox.get(timeout=timeout_s) if timeout_s > 0 else self.inbox.get_nowait())
        except queue.Empty:
            return
        while True:
            try:
                self.take(self.inbox.get_nowait())
            except queue.Empty:
                return

    def send(self, res: Result | StepReport) -> None:
        self.deliver(res)


class InProcessStageClient(_Futures):
    """A stage engine on a thread of this process, behind the same driver loop as a stage process."""

    restartable = False
    generation = 1

    def __init__(self, engine: Any, stage: str, replica: int, *, max_batch_size: int,
                 batch_timeout_ms: float, max_batch_pixels: int = 0, scheduling: str = "request",
                 priority_aging_s: float = 10.0, max_padding_waste: float | None = None) -> None:
        super().__init__()
        self.stage, self.replica = stage, replica
        self.ready = False
        self.on_ready: Callable[[StageClient], None] | None = None
        self.executor = StageExecutor(engine, stage, replica, max_batch_size=max_batch_size,
                                      batch_timeout_ms=batch_timeout_ms, max_batch_pixels=max_batch_pixels,
                                      scheduling=scheduling, priority_aging_s=priority_aging_s,
                                      max_padding_waste=max_padding_waste)
        self.inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._crash: BaseException | None = None

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.replica}] (in process)"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        driver = _QueueDriver(self.executor, self.inbox,
                              lambda res: loop.call_soon_threadsafe(self.deliver, res))
        self._thread = threading.Thread(target=self._run, args=(driver,), name=f"omni-{self.stage}", daemon=True)
        self._thread.start()
        self.ready = True
        if self.on_ready is not None:
            self.on_ready(self)

    def _run(self, driver: _QueueDriver) -> None:
        try:
            driver.loop()
        except BaseException as e:  # a bug of ours: the client reports itself dead
            logger.exception("%s: the driver thread died", self.label)
            self._crash = e

    def dead(self) -> tuple[int, int | None] | None:
        return (0, None) if self._crash is not None else None

    def hung(self) -> tuple[int, str] | None:
        return None  # a thread of this process: nothing to kill

    def forgive(self) -> None:
        pass  # no heartbeats

    async def submit(self, work: Work) -> asyncio.Future:
        fut = self.add(work)
        self.inbox.put(work)
        return fut

    async def cancel(self, work: Work) -> None:
        if self.forget(work):
            self.inbox.put(Cancel(work.req_id))

    def fail_inflight(self, exc: BaseException) -> None:
        self.fail(exc)

    async def restart(self, delay: float) -> None:
        raise RuntimeError(f"{self.label} cannot be restarted")

    async def stop(self) -> None:
        self.ready = False
        self.inbox.put(Stop())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def close(self) -> None:
        self.executor.close()


# ------------------------------------------------------------------------------------------------ sets


class StageSet:
    """Every client of a runtime, by stage, plus what they share (a launcher and result listener, or nothing)."""

    def __init__(self, clients: dict[str, list[StageClient]]) -> None:
        self.clients = clients

    async def open(self) -> list[Any]:
        """Start every client; returns the coroutines that must keep running (the orchestrator watches them)."""
        for reps in self.clients.values():
            for c in reps:
                await c.start()
        return []

    async def close(self, timeout: float) -> None:
        for reps in self.clients.values():
            for c in reps:
                await c.stop()
        for reps in self.clients.values():
            for c in reps:
                c.close()


class ZmqStageSet(StageSet):
    def __init__(self, cfg: RuntimeConfig) -> None:
        self.launcher = make_launcher(cfg)
        self.zmq_clients = {s: [ZmqStageClient(p, cfg.server.stall_timeout_s) for p in self.launcher.replicas[s]]
                            for s in STAGE_NAMES}
        super().__init__(self.zmq_clients)  # type: ignore[arg-type]
        self.listener: ResultListener | None = None

    async def open(self) -> list[Any]:
        self.listener = ResultListener(self.launcher.result_addr, self.zmq_clients)
        await super().open()
        return [self.listener.run()]

    async def close(self, timeout: float) -> None:
        for reps in self.zmq_clients.values():
            for c in reps:
                await c.stop()
        await asyncio.to_thread(self.launcher.shutdown, timeout)
        for reps in self.zmq_clients.values():
            for c in reps:
                c.close()
        if self.listener is not None:
            self.listener.close()


def make_launcher(cfg: RuntimeConfig) -> Any:
    """The launcher ``[placement] launcher`` names: ``runtime.launcher.LocalLauncher`` (processes on this node) or
    ``runtime.ray_launcher.RayLauncher`` (Ray actors on any node; imported only then: Ray is optional). Both
    implement ``runtime.launcher.StageLauncher`` and give every replica a handle with the same surface."""
    if cfg.placement.launcher == "ray":
        from omni_runtime.runtime.ray_launcher import RayLauncher

        return RayLauncher(cfg)
    from omni_runtime.runtime.launcher import LocalLauncher

    return LocalLauncher(cfg)


def zmq_stages(cfg: RuntimeConfig) -> ZmqStageSet:
    """A client per replica of every stage, each a group of rank processes."""
    return ZmqStageSet(cfg)


async def in_process_stages(cfg: RuntimeConfig) -> StageSet:
    """One in-process client per stage (engines loaded here, on this process's device)."""
    from omni_runtime.runtime.stage_worker import stage_options
    from omni_runtime.stages.engine import load_engine

    clients: dict[str, list[StageClient]] = {}
    for s in STAGE_NAMES:
        st = cfg.stages.get(s)
        den = cfg.stages.denoiser
        options = stage_options(s, cfg.stages.vae.tiling, den.batch_invariant, den.mixed_sizes, den.cpu_linear,
                                cfg.lora.max_loaded, cfg.lora.adapters, den.compile)
        engine = await asyncio.to_thread(load_engine, s, cfg.model.path, cfg.model.dtype, cfg.model.device,
                                         **options)
        clients[s] = [InProcessStageClient(engine, s, 0, max_batch_size=st.max_batch_size,
                                           batch_timeout_ms=st.batch_timeout_ms,
                                           max_batch_pixels=st.max_batch_pixels, scheduling=den.scheduling,
                                           priority_aging_s=den.priority_aging_s,
                                           max_padding_waste=den.max_padding_waste if den.mixed_sizes else None)]
    return StageSet(clients)
