"""The control hub (asyncio): request ids, routing, backpressure, deadlines, cancellation and stage health.

A request of ``n`` images becomes ``n`` items (item ``i`` uses seed ``seed + i``); each item hops
text_encoder -> denoiser -> vae, each hop to the least-loaded ready replica of that stage. Tensors stay in shared
memory: a hop's result carries a ``comm.shm_tensor`` handle that the orchestrator passes on (and releases itself
only when an item is abandoned). When a rank process dies, the items in flight on its replica fail at once with
:class:`StageUnavailable` (HTTP 503 naming the stage), the replica is killed, swept and restarted, and items that
had not reached it wait for the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from omni_runtime.comm import shm_tensor
from omni_runtime.runtime.config import STAGE_NAMES, RuntimeConfig
from omni_runtime.runtime.launcher import Launcher, ReplicaProcs
from omni_runtime.runtime.messages import Cancel, Outbound, Ready, Result, Stop, Work
from omni_runtime.runtime.metrics import Metrics
from omni_runtime.runtime.requests import GenerationRequest

logger = logging.getLogger(__name__)

HEALTH_POLL_S = 0.1


class ServingError(Exception):
    status = 500
    code = "internal_error"
    kind = "server_error"


class Overloaded(ServingError):
    status, code, kind = 429, "queue_full", "rate_limit_error"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StageUnavailable(ServingError):
    status, code, kind = 503, "stage_unavailable", "server_error"


class DeadlineExceeded(ServingError):
    status, code, kind = 504, "deadline_exceeded", "timeout_error"


class StageFailed(ServingError):
    status, code, kind = 500, "stage_failed", "server_error"


class BadRequestInStage(ServingError):
    status, code, kind = 400, "invalid_request", "invalid_request_error"


@dataclass
class _Replica:
    procs: ReplicaProcs
    sock: zmq.asyncio.Socket | None = None
    ready: bool = False
    outstanding: int = 0
    inflight: dict[tuple[str, int], asyncio.Future] = field(default_factory=dict)
    restarts: int = 0
    restarting: bool = False
    crash_loop: int = 0


class Orchestrator:
    """Owns the launcher, the sockets and every in-flight item. Use ``await start()`` / ``await shutdown()``."""

    def __init__(self, cfg: RuntimeConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.launcher = Launcher(cfg)
        self.ctx = zmq.asyncio.Context()
        self.replicas: dict[str, list[_Replica]] = {
            s: [_Replica(p) for p in self.launcher.replicas[s]] for s in STAGE_NAMES}
        self.waiting: dict[str, int] = dict.fromkeys(STAGE_NAMES, 0)
        self.ready_event: dict[str, asyncio.Event] = {}
        self.enc = msgspec.msgpack.Encoder()
        self.dec = msgspec.msgpack.Decoder(Outbound)
        self.tasks: list[asyncio.Task] = []
        self.closed = False
        self.started_at = time.time()
        self.results: zmq.asyncio.Socket | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self, timeout: float = 600.0) -> None:
        """Launch every replica and return once all of them announced Ready (the readiness handshake)."""
        from omni_runtime.runtime.model_store import ensure_model

        await asyncio.to_thread(ensure_model, self.cfg.model.path)
        self.ready_event = {s: asyncio.Event() for s in STAGE_NAMES}
        self.results = self.ctx.socket(zmq.PULL)
        self.results.setsockopt(zmq.LINGER, 0)
        self.results.setsockopt(zmq.RCVHWM, 100_000)
        self.results.bind(self.launcher.result_addr)
        self.tasks.append(asyncio.create_task(self._listen(), name="omni-results"))
        for reps in self.replicas.values():
            for r in reps:
                self._start_replica(r)
        end = time.monotonic() + timeout
        for s in STAGE_NAMES:
            while not all(r.ready for r in self.replicas[s]):
                for r in self.replicas[s]:
                    dead = r.procs.dead_rank()
                    if dead is not None:
                        raise StageUnavailable(f"stage {s}: {r.procs.label} rank {dead[0]} exited with code "
                                               f"{dead[1]} while starting (its log lines above say why)")
                if time.monotonic() > end:
                    raise StageUnavailable(f"stage {s} did not become ready within {timeout:.0f}s")
                await asyncio.sleep(0.05)
        self.tasks.append(asyncio.create_task(self._watch(), name="omni-health"))
        logger.info("all stages ready")

    def _start_replica(self, r: _Replica) -> None:
        r.ready = False
        if r.sock is not None:
            r.sock.close(linger=0)
        r.procs.start()
        r.sock = self.ctx.socket(zmq.PUSH)
        r.sock.setsockopt(zmq.LINGER, 0)
        r.sock.setsockopt(zmq.SNDHWM, 100_000)
        r.sock.connect(r.procs.in_addr)

    async def shutdown(self) -> None:
        """Stop every replica gracefully (then kill), fail what is in flight, sweep shm, close the sockets."""
        if self.closed:
            return
        self.closed = True
        for t in self.tasks:
            if t.get_name() == "omni-health":
                t.cancel()
        for reps in self.replicas.values():
            for r in reps:
                self._fail_inflight(r, StageUnavailable(f"stage {r.procs.label} is shutting down"))
                if r.sock is not None:
                    with contextlib.suppress(zmq.ZMQError):
                        await r.sock.send(self.enc.encode(Stop()))
        await asyncio.to_thread(self.launcher.shutdown, 5.0)
        for t in self.tasks:
            t.cancel()
        for reps in self.replicas.values():
            for r in reps:
                if r.sock is not None:
                    r.sock.close(linger=0)
        if self.results is not None:
            self.results.close(linger=0)
        self.ctx.term()
        logger.info("orchestrator stopped")

    # ---------------------------------------------------------------- health

    def _fail_inflight(self, r: _Replica, exc: Exception) -> None:
        for fut in r.inflight.values():
            if not fut.done():
                fut.set_exception(exc)
        r.inflight.clear()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            for reps in self.replicas.values():
                for r in reps:
                    if r.restarting:
                        continue
                    dead = r.procs.dead_rank()
                    if dead is None:
                        continue
                    rank, code = dead
                    label = r.procs.label
                    msg = (f"stage {r.procs.stage} failed: {label} rank {rank} died (exit code {code}); "
                           f"the replica is being restarted, retry the request")
                    logger.error(msg)
                    self.metrics.errors.labels(stage=r.procs.stage, kind="stage_died").inc()
                    # a replica that dies before it ever got ready again is crash-looping: back off
                    r.crash_loop = r.crash_loop + 1 if not r.ready else 0
                    r.ready = False
                    r.restarting = True
                    self._fail_inflight(r, StageUnavailable(msg))
                    self.tasks.append(asyncio.create_task(self._restart(r, min(30.0, 2.0 ** r.crash_loop - 1))))

    async def _restart(self, r: _Replica, delay: float) -> None:
        try:
            await asyncio.to_thread(r.procs.kill)
            if delay:
                logger.warning("%s keeps dying while starting; restarting in %.0fs", r.procs.label, delay)
                await asyncio.sleep(delay)
            if not self.closed:
                r.restarts += 1
                self._start_replica(r)
        finally:
            r.restarting = False

    # ---------------------------------------------------------------- results

    async def _listen(self) -> None:
        while True:
            frames = await self.results.recv_multipart(copy=False)
            try:
                msg = self.dec.decode(frames[0].buffer)
            except msgspec.DecodeError as e:
                logger.error("dropped an undecodable result: %s", e)
                continue
            if isinstance(msg, Ready):
                r = self.replicas[msg.stage][msg.replica]
                r.ready = True
                self.ready_event[msg.stage].set()
                logger.info("%s ready (generation %d)", r.procs.label, r.procs.generation)
                continue
            self._on_result(msg)

    def _on_result(self, res: Result) -> None:
        r = self.replicas[res.stage][res.replica]
        fut = r.inflight.pop((res.req_id, res.index), None)
        if res.first_in_batch and res.ok:
            self.metrics.batch_size.labels(stage=res.stage).observe(res.batch_size)
        if res.ok:
            self.metrics.compute.labels(stage=res.stage).observe(res.compute_s)
            self.metrics.queue_wait.labels(stage=res.stage).observe(res.queue_s)
        if fut is None or fut.done():
            if res.output is not None:  # nobody waits for it any more (cancelled, timed out)
                shm_tensor.release(res.output)
            return
        fut.set_result(res)

    # ---------------------------------------------------------------- requests

    def health(self) -> dict[str, list[bool]]:
        return {s: [r.ready for r in reps] for s, reps in self.replicas.items()}

    def _check_admission(self, n: int) -> None:
        for s in STAGE_NAMES:
            if self.waiting[s] + n > self.cfg.server.max_queue:
                self.metrics.errors.labels(stage=s, kind="queue_full").inc()
                raise Overloaded(f"stage {s} has {self.waiting[s]} items queued (max_queue "
                                 f"{self.cfg.server.max_queue}); retry later", retry_after=1)

    async def generate(self, req: GenerationRequest) -> list[bytes]:
        """Run one request end to end; returns the encoded images in seed order."""
        if self.closed:
            raise StageUnavailable("the runtime is shutting down")
        self._check_admission(req.n)
        rid = uuid.uuid4().hex
        deadline = time.time() + self.cfg.server.request_timeout_s
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(self._item(rid, i, req, deadline)) for i in range(req.n)]
        try:
            images = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        self.metrics.request_latency.observe(time.monotonic() - t0)
        return list(images)

    async def _item(self, rid: str, index: int, req: GenerationRequest, deadline: float) -> bytes:
        handle = None
        for stage in STAGE_NAMES:
            work = Work(req_id=rid, index=index, seed=req.seed + index, params=req, inputs=handle,
                        deadline=deadline)
            res = await self._hop(stage, work)
            handle = res.output
        assert res.image is not None
        return res.image

    async def _pick(self, stage: str, deadline: float) -> _Replica:
        while True:
            ready = [r for r in self.replicas[stage] if r.ready]
            if ready:
                return min(ready, key=lambda r: r.outstanding)
            if self.closed:
                raise StageUnavailable(f"stage {stage} is shutting down")
            ev = self.ready_event[stage]
            ev.clear()
            left = deadline - time.time()
            if left <= 0:
                raise DeadlineExceeded(f"no replica of stage {stage} became ready before the request deadline")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ev.wait(), min(left, 0.5))

    async def _hop(self, stage: str, work: Work) -> Result:
        key = (work.req_id, work.index)
        self.waiting[stage] += 1
        self.metrics.queue_depth.labels(stage=stage).set(self.waiting[stage])
        t0 = time.monotonic()
        sent = False
        try:
            r = await self._pick(stage, work.deadline)
            fut = asyncio.get_running_loop().create_future()
            r.inflight[key] = fut
            r.outstanding += 1
            try:
                work.sent_at = time.time()
                await r.sock.send(self.enc.encode(work))
                sent = True
                left = work.deadline - time.time()
                try:
                    res = await asyncio.wait_for(fut, max(0.0, left))
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(f"the request exceeded request_timeout_s="
                                           f"{self.cfg.server.request_timeout_s:g} in stage {stage}") from None
            finally:
                r.outstanding -= 1
                if r.inflight.get(key) is fut:
                    del r.inflight[key]
                    if sent and r.sock is not None:  # abandoned while the stage has it: tell the driver
                        with contextlib.suppress(zmq.ZMQError):
                            await r.sock.send(self.enc.encode(Cancel(work.req_id)))
        except BaseException as e:
            # A live driver that got the work releases its inputs itself (after running or dropping it);
            # otherwise nobody else will release the previous stage's output.
            if work.inputs is not None and (not sent or isinstance(e, StageUnavailable)):
                shm_tensor.release(work.inputs)
            if isinstance(e, ServingError):
                self.metrics.errors.labels(stage=stage, kind=e.code).inc()
            raise
        finally:
            self.waiting[stage] -= 1
            self.metrics.queue_depth.labels(stage=stage).set(self.waiting[stage])
        self.metrics.stage_latency.labels(stage=stage).observe(time.monotonic() - t0)
        if not res.ok:
            if res.user_error:
                raise BadRequestInStage(f"stage {stage} rejected the request: {res.error}")
            self.metrics.errors.labels(stage=stage, kind="stage_failed").inc()
            raise StageFailed(f"stage {stage} failed: {res.error}")
        return res
