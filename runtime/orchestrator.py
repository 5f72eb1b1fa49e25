"""The control hub (asyncio): request ids, routing, backpressure, deadlines, cancellation and stage health.

A request of ``n`` images becomes ``n`` items (item ``i`` uses seed ``seed + i``); each item hops
text_encoder -> denoiser -> vae, each hop to the least-loaded ready replica of that stage. The orchestrator reaches
a replica only through its :class:`~runtime.stage_client.StageClient` (rank processes over ZMQ, or the same
engines in this process). Tensors never pass through here: a hop's result carries a
``runtime.tensor_handoff`` ref that the orchestrator passes on (and releases itself only when an item is
abandoned).

Admission is atomic: a request of ``n`` images is admitted only if every stage has room for ``n`` more items
(``server.max_queue``), and the room is taken in the same step (no await between check and count); an item gives
its place at a stage back when it leaves that stage. When a rank process dies, the items in flight on its replica
fail at once with :class:`StageUnavailable` (HTTP 503 naming the stage and the rank), the replica is killed,
swept and restarted, and items that had not reached it wait for the restart. A *hung* rank (no heartbeat, or one step
or collective past ``[server] stall_timeout_s``: ``runtime.liveness``) fails its replica the same way, the 503 saying
"hung"; the SIGKILL also frees what the replica held on the node (the compute token), so the other stages go on.
:meth:`Orchestrator.replica_health` says each replica's state (``ready``, ``starting``, ``hung``, ``restarting``)
for ``/health`` and the ``omni_replicas`` gauge. If a task the frontend cannot serve
without (the result listener, the health watch) ends, :attr:`Orchestrator.failure` says why, ``health()`` reports
it, every waiting item fails, and ``on_fatal`` is called (``serve`` then exits non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from omni_runtime.runtime import tensor_handoff
from omni_runtime.runtime.config import STAGE_NAMES, RuntimeConfig
from omni_runtime.runtime.image_stream import ImageEvent, ImageStream
from omni_runtime.runtime.lora_registry import LoraRegistry
from omni_runtime.runtime.messages import Preview, Result, StepReport, Work
from omni_runtime.runtime.metrics import Metrics
from omni_runtime.runtime.progress import ProgressBook
from omni_runtime.runtime.requests import GenerationRequest, RequestError, parse_request
from omni_runtime.runtime.stage_client import StageClient, StageSet

logger = logging.getLogger(__name__)

HEALTH_POLL_S = 0.1
LOOP_LAG_S = 1.0  # a health tick this late means the frontend itself stalled: heartbeats are not judged on it
REPLICA_STATES = ("ready", "starting", "hung", "restarting")
DEAD_RANK_GRACE_S = 1.0  # after a failed batch, how long to look for the dead rank that caused it
WARMUP_ATTEMPTS = 3  # compile warm-up: sends of the 2-image request until a step ran both images together


def hops(req: GenerationRequest) -> list[tuple[str, str]]:
    """The (stage, task) hops of one image: text encoder, denoiser, VAE; an edit (``req.images``) visits the VAE
    first to encode its input image (``"encode"``; the text encoder's tensors ride along) and only that hop
    carries the image files (docs/ARCHITECTURE.md, "Image edits")."""
    if req.is_edit:
        from omni_runtime.stages.engine import ENCODE  # the engines' name of the VAE's second job

        return [("text_encoder", ""), ("vae", ENCODE), ("denoiser", ""), ("vae", "")]
    return [(stage, "") for stage in STAGE_NAMES]


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


class DuplicateRequestId(ServingError):
    status, code, kind = 409, "duplicate_request_id", "invalid_request_error"


class Orchestrator:
    """Owns the stage clients and every in-flight item. Use ``await start()`` / ``await shutdown()``.

    ``in_process=True`` runs the engines in this process (``Omni(in_process=True)``); otherwise every replica is a
    group of rank processes; ``stages`` gives the clients explicitly instead. ``on_fatal(reason)`` is called once
    if the orchestrator can no longer serve."""

    def __init__(self, cfg: RuntimeConfig, metrics: Metrics | None = None, *, in_process: bool = False,
                 stages: StageSet | None = None, on_fatal: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.in_process = in_process
        self.on_fatal = on_fatal
        self.stages: StageSet | None = stages
        self.replicas: dict[str, list[StageClient]] = {s: [] for s in STAGE_NAMES}
        self.waiting: dict[str, int] = dict.fromkeys(STAGE_NAMES, 0)
        self.ready_event: dict[str, asyncio.Event] = {}
        self.tasks: list[asyncio.Task] = []
        self.restarting: set[int] = set()
        self.crash_loop: dict[int, int] = {}
        self.failures: dict[int, dict[str, object]] = {}  # the last failure of a replica (by id of its client)
        self.recovering: set[int] = set()  # failed and not ready again yet
        self.closed = False
        self.failure: str | None = None
        self.started_at = time.time()
        self.progress = ProgressBook()  # GET /v1/requests/{id}
        self.widest_step = 0  # the most items a denoiser step reported since the compile warm-up last reset it
        self.loras = LoraRegistry(cfg)  # LoRA adapters by name ([lora], /v1/loras)
        self.streams: dict[str, ImageStream] = {}  # streamed requests by id (runtime.image_stream)

    # ---------------------------------------------------------------- lifecycle

    async def start(self, timeout: float = 600.0) -> None:
        """Start every replica and return once all of them announced Ready (the readiness handshake)."""
        from omni_runtime.runtime.model_store import ensure_model
        from omni_runtime.runtime.stage_client import in_process_stages, zmq_stages

        await asyncio.to_thread(ensure_model, self.cfg.model.path)
        await asyncio.to_thread(self.loras.preload)  # a bad [lora] adapter stops the start, naming its key
        self.ready_event = {s: asyncio.Event() for s in STAGE_NAMES}
        if self.stages is None:
            self.stages = await in_process_stages(self.cfg) if self.in_process else zmq_stages(self.cfg)
        self.replicas = self.stages.clients
        for reps in self.replicas.values():
            for c in reps:
                c.on_ready = self._on_ready
                c.on_report = self._on_report
                c.on_preview = self._on_preview
        for coro in await self.stages.open():
            self._critical(coro, "omni-results")
        end = time.monotonic() + timeout
        for s in STAGE_NAMES:
            while not all(c.ready for c in self.replicas[s]):
                for c in self.replicas[s]:
                    dead = c.dead()
                    if dead is not None:
                        how = (f"exited with code {dead[1]}" if dead[1] is not None and dead[1] >= 0
                               else f"ended ({self.exit_text(dead[1])})")
                        raise StageUnavailable(f"stage {s}: {c.label} rank {dead[0]} {how} while starting (its "
                                               f"log lines above say why)")
                if self.failure is not None:
                    raise StageUnavailable(f"the orchestrator failed while starting: {self.failure}")
                if time.monotonic() > end:
                    raise StageUnavailable(f"stage {s} did not become ready within {timeout:.0f}s")
                await asyncio.sleep(0.05)
        self._critical(self._watch(), "omni-health")
        self.publish_states()
        logger.info("all stages ready")
        if self.cfg.stages.denoiser.compile and self.cfg.stages.denoiser.compile_warmup:
            await self._compile_warmup()

    async def _compile_warmup(self) -> None:
        """``[stages.denoiser] compile``: one request of 1 and one of 2 images per ``compile_warmup`` size, so the
        denoiser's compiled graphs (one row, and several: dynamic rows and tokens) exist before the first user's
        request; the start waits for them (``serve`` is healthy after). The 2-image request is sent again (up to
        :data:`WARMUP_ATTEMPTS` times) until a denoiser step reported both images (its step reports'
        ``active``). A size the model cannot take stops the start, naming the key."""
        t0 = time.monotonic()
        for size in self.cfg.stages.denoiser.compile_warmup:
            for n in (1, 2):
                for attempt in range(1, WARMUP_ATTEMPTS + 1):
                    self.widest_step = 0
                    try:
                        req = parse_request({"prompt": "warm-up", "size": size, "n": n, "num_inference_steps": 2,
                                             "seed": 0})
                        await self.generate(req)
                    except (RequestError, BadRequestInStage) as e:
                        raise StageUnavailable(f"stages.denoiser.compile_warmup: size {size!r} cannot run: "
                                               f"{e}") from e
                    # the two images are two items: on a busy machine the first may finish its steps before the
                    # second joins, and then no step ran (and compiled) several rows; send them again
                    if self.widest_step >= n:
                        break
                    logger.info("compile warm-up %s: no step ran %d images together (attempt %d of %d)", size, n,
                                attempt, WARMUP_ATTEMPTS)
        logger.info("compile warm-up: %d size(s) x 1 and 2 images in %.1f s",
                    len(self.cfg.stages.denoiser.compile_warmup), time.monotonic() - t0)

    def _on_report(self, msg: StepReport) -> None:
        """A denoiser step: progress of its items, step metrics."""
        self.progress.report(msg)
        self.widest_step = max(self.widest_step, msg.active)
        self.metrics.observe_step(msg.replica, msg.step_s, msg.active, msg.admitted, msg.retired,
                                  msg.padding_waste)

    def _on_preview(self, msg: Preview) -> None:
        """A denoiser's preview of a streamed request's image: its stream has it decoded (released if it is gone)."""
        stream = self.streams.get(msg.req_id)
        if stream is None:
            tensor_handoff.release(msg.output)
        else:
            stream.preview(msg)

    def _on_ready(self, c: StageClient) -> None:
        self.recovering.discard(id(c))
        if c.stage in self.ready_event:
            self.ready_event[c.stage].set()

    def _critical(self, coro, name: str) -> None:
        """Run a task the frontend cannot serve without: if it ends while not shutting down, fail."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._critical_done)
        self.tasks.append(task)

    def _critical_done(self, task: asyncio.Task) -> None:
        if self.closed or task.cancelled():
            return
        exc = task.exception()
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "it returned"
        self.fail(f"the task {task.get_name()} ended ({why})", exc)

    def fail(self, reason: str, exc: BaseException | None = None) -> None:
        """The orchestrator can no longer serve: record why, fail everything waiting, tell ``on_fatal``."""
        if self.failure is not None:
            return
        self.failure = reason
        logger.critical("the orchestrator cannot serve any more: %s", reason, exc_info=exc)
        err = StageUnavailable(f"the server cannot serve any more: {reason}")
        for reps in self.replicas.values():
            for c in reps:
                c.fail_inflight(err)
        for ev in self.ready_event.values():
            ev.set()
        if self.on_fatal is not None:
            try:
                self.on_fatal(reason)
            except Exception:
                logger.exception("on_fatal failed")

    async def shutdown(self) -> None:
        """Stop every replica gracefully (then kill), fail what is in flight, sweep shm, close the channels."""
        if self.closed:
            return
        self.closed = True
        for t in self.tasks:
            if t.get_name() == "omni-health":
                t.cancel()
        for reps in self.replicas.values():
            for c in reps:
                c.fail_inflight(StageUnavailable(f"stage {c.label} is shutting down"))
        if self.stages is not None:
            await self.stages.close(5.0)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        logger.info("orchestrator stopped")

    # ---------------------------------------------------------------- health

    async def _watch(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            now = time.monotonic()
            lagged, last = now - last > HEALTH_POLL_S + LOOP_LAG_S, now
            for reps in self.replicas.values():
                for c in reps:
                    if id(c) in self.restarting:
                        continue
                    dead = c.dead()
                    if dead is not None:
                        self._on_death(c, *dead)
                    elif lagged:  # this process did not run: late heartbeats are not the ranks' fault
                        c.forgive()
                    else:
                        hung = c.hung()
                        if hung is not None:
                            self._on_hung(c, *hung)
                    if self.failure is not None:
                        return
            self.publish_states()

    def _on_death(self, c: StageClient, rank: int, code: int | None) -> str:
        """A rank of ``c`` is gone: fail what is in flight there, take the replica out of routing and restart it
        (once: later calls for the same death only return the message)."""
        return self._fail_replica(c, rank, "died", self._died(c, rank, code))

    def _on_hung(self, c: StageClient, rank: int, why: str) -> str:
        """A rank of ``c`` is hung (``runtime.liveness``): the same as a death; the restart SIGKILLs its processes."""
        return self._fail_replica(c, rank, "hung", f"stage {c.stage} failed: {c.label} rank {rank} hung"
                                                   f"{self._where(c, rank)}: it {why}")

    def _fail_replica(self, c: StageClient, rank: int, cause: str, what: str) -> str:
        msg = what + "; the replica is being restarted, retry the request"
        if id(c) in self.restarting:
            return msg
        logger.error(msg)
        self.metrics.errors.labels(stage=c.stage, kind="stage_died" if cause == "died" else "stage_hung").inc()
        self.metrics.replica_failures.labels(stage=c.stage, cause=cause).inc()
        self.failures[id(c)] = {"cause": cause, "rank": rank, "message": what, "at": time.time()}
        c.fail_inflight(StageUnavailable(msg))
        if not c.restartable:
            self.fail(msg)
            return msg
        # a replica that dies before it ever got ready again is crash-looping: back off
        n = self.crash_loop[id(c)] = self.crash_loop.get(id(c), 0) + 1 if not c.ready else 0
        c.ready = False
        self.recovering.add(id(c))
        self.restarting.add(id(c))
        self.tasks.append(asyncio.create_task(self._restart(c, min(30.0, 2.0 ** n - 1))))
        self.publish_states()
        return msg

    @staticmethod
    def _where(c: StageClient, rank: int) -> str:
        node = getattr(c, "rank_node", None)  # clients of rank processes know the node (local or Ray)
        return f" on node {node(rank)}" if node is not None else ""

    @staticmethod
    def exit_text(code: int | None) -> str:
        """How a process ended, in words: ``exit code 1``, ``killed by signal SIGKILL`` (a negative code)."""
        if code is None:
            return "exit status unknown"
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    @classmethod
    def _died(cls, c: StageClient, rank: int, code: int | None) -> str:
        return f"stage {c.stage} failed: {c.label} rank {rank} died ({cls.exit_text(code)}){cls._where(c, rank)}"

    async def _restart(self, c: StageClient, delay: float) -> None:
        try:
            if not self.closed:
                await c.restart(delay)
        finally:
            self.restarting.discard(id(c))

    def replica_state(self, c: StageClient) -> str:
        """One of :data:`REPLICA_STATES`: ``ready`` (serving), ``hung`` (found hung, its processes being killed),
        ``restarting`` (failed, its new processes loading), ``starting`` (never ready yet)."""
        if c.ready:
            return "ready"
        if id(c) in self.recovering:
            failure = self.failures.get(id(c), {})
            return "hung" if failure.get("cause") == "hung" and getattr(c, "killing", False) else "restarting"
        return "starting"

    def replica_health(self) -> dict[str, list[dict[str, object]]]:
        """Every replica by stage: its state, generation (starts) and last failure (cause, rank, message, at)."""
        return {s: [{"state": self.replica_state(c), "generation": getattr(c, "generation", 1),
                     "last_failure": self.failures.get(id(c))} for c in reps]
                for s, reps in self.replicas.items()}

    def publish_states(self) -> None:
        """The ``omni_replicas{stage, state}`` gauge."""
        for s, reps in self.replicas.items():
            counts = dict.fromkeys(REPLICA_STATES, 0)
            for c in reps:
                counts[self.replica_state(c)] += 1
            for state, n in counts.items():
                self.metrics.replicas.labels(stage=s, state=state).set(n)

    # ---------------------------------------------------------------- requests

    def health(self) -> dict[str, list[bool]]:
        """Readiness of every replica by stage; when the orchestrator has failed, also ``"orchestrator": [False]``."""
        out = {s: [c.ready for c in reps] for s, reps in self.replicas.items()}
        if self.failure is not None:
            out["orchestrator"] = [False]
        return out

    def _admit(self, n: int) -> None:
        """Take room for ``n`` items at every stage, or raise :class:`Overloaded` taking none (no await here:
        check and count are one step for the event loop)."""
        limit = self.cfg.server.max_queue
        for s in STAGE_NAMES:
            if self.waiting[s] + n > limit:
                self.metrics.errors.labels(stage=s, kind="queue_full").inc()
                raise Overloaded(f"stage {s} has {self.waiting[s]} items queued (max_queue {limit}); "
                                 f"retry later", retry_after=1)
        for s in STAGE_NAMES:
            self._count(s, n)

    def _count(self, stage: str, delta: int) -> None:
        self.waiting[stage] += delta
        self.metrics.queue_depth.labels(stage=stage).set(self.waiting[stage])

    async def generate(self, req: GenerationRequest, request_id: str | None = None,
                       report: dict[str, Any] | None = None, *,
                       on_event: Callable[[ImageEvent], None] | None = None) -> list[bytes]:
        """Run one request end to end; returns the encoded images in seed order. ``request_id``: the id its
        progress is known by (``progress.get``; checked by the caller with ``progress.valid_request_id``), a new
        one if None; :class:`DuplicateRequestId` while another request with that id is in flight. ``report``: a
        dict that gets the response's extension fields (``cache``: what the denoiser's cache skipped, summed over
        the images; ``peak_memory_mb``: each stage's peak memory over the request's images, ``runtime.peak_memory``). ``on_event`` (streaming): called with each image as it is done and with its
        ``req.partial_images`` previews (``runtime.image_stream``). Everything that can refuse the request raises
        before the first await."""
        if self.closed or self.failure is not None:
            raise StageUnavailable(f"the runtime is {'shutting down' if self.closed else 'failed: ' + self.failure}")
        try:
            req = self.loras.resolve(req)  # each adapter's file and version, for every denoiser rank
        except RequestError as e:
            raise BadRequestInStage(str(e)) from None
        if req.cache is None:  # the config's default ([stages.denoiser.cache]; off unless set)
            default = self.cfg.stages.denoiser.cache.request_default()
            if default is not None:
                req = msgspec.structs.replace(req, cache=default)
        rid = request_id or uuid.uuid4().hex
        if self.progress.busy(rid):
            raise DuplicateRequestId(f"request id {rid!r} is in use by a request in flight; allowed: an id no "
                                     f"running request has")
        self._admit(req.n)
        self.progress.open(rid, req.n, req.num_inference_steps, getattr(req, "priority", 0))
        deadline = time.time() + self.cfg.server.request_timeout_s
        t0 = time.monotonic()
        report = report if report is not None else {}
        stream = None
        if on_event is not None:
            stream = self.streams[rid] = ImageStream(req, deadline, on_event, self._hop)
        tasks = [asyncio.ensure_future(self._item(rid, i, req, deadline, report, stream)) for i in range(req.n)]
        try:
            images = await asyncio.gather(*tasks)
        except BaseException as e:
            self.progress.close(rid, "cancelled" if isinstance(e, asyncio.CancelledError) else "failed")
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            if stream is not None:
                self.streams.pop(rid, None)
                await stream.close()
        self.progress.close(rid, "completed")
        self.metrics.request_latency.observe(time.monotonic() - t0)
        return list(images)

    async def _item(self, rid: str, index: int, req: GenerationRequest, deadline: float,
                    report: dict[str, Any], stream: ImageStream | None = None) -> bytes:
        """One image through its hops (:func:`hops`); it holds a place at each stage until its last hop there."""
        path = hops(req)
        last = {stage: i for i, (stage, _) in enumerate(path)}
        handle = None
        left: set[str] = set()
        try:
            for i, (stage, task) in enumerate(path):
                # the image files ride to the encode hop and to the text encoder (whose embeddings may see them:
                # Qwen-Image-Edit's); the other hops get the request without them
                carry = task or stage == "text_encoder"
                work = Work(req_id=rid, index=index, seed=req.seed + index, params=req if carry else
                            req.without_images(), inputs=handle, deadline=deadline, task=task)
                try:
                    res = await self._hop(stage, work)
                finally:
                    if last[stage] == i:
                        self._count(stage, -1)
                        left.add(stage)
                handle = res.output
                if res.peak_memory_mb > 0:  # each stage's driver rank, the most over the request's hops there
                    self.metrics.peak_memory.labels(stage=stage).observe(res.peak_memory_mb)
                    peaks = report.setdefault("peak_memory_mb", {})
                    peaks[stage] = max(peaks.get(stage, 0.0), round(res.peak_memory_mb, 1))
                if stage == "denoiser":
                    self.progress.denoised(rid, index)
                    if res.cache:
                        self.metrics.observe_cache(res.cache)
                        total = report.setdefault("cache", {"method": res.cache["method"]})
                        for k, v in res.cache.items():
                            if k != "method":
                                total[k] = total.get(k, 0) + v
        finally:
            for stage in STAGE_NAMES:
                if stage not in left:
                    self._count(stage, -1)
        assert res.image is not None
        if stream is not None:
            stream.final(index, res.image)
        return res.image

    async def _pick(self, stage: str, deadline: float) -> StageClient:
        while True:
            if self.failure is not None:
                raise StageUnavailable(f"the server cannot serve any more: {self.failure}")
            ready = [c for c in self.replicas[stage] if c.ready]
            if ready:
                return min(ready, key=lambda c: c.outstanding)
            if self.closed:
                raise StageUnavailable(f"stage {stage} is shutting down")
            ev = self.ready_event[stage]
            ev.clear()
            left = deadline - time.time()
            if left <= 0:
                raise DeadlineExceeded(f"no replica of stage {stage} became ready before the request deadline")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ev.wait(), min(left, 0.5))

    async def _dead_rank_of(self, c: StageClient) -> StageUnavailable | None:
        """After a batch failed: if a rank of the replica died (its peers' collectives then fail with raw
        transport errors), the error to report is that death."""
        end = time.monotonic() + DEAD_RANK_GRACE_S
        while True:
            dead = c.dead()
            if dead is not None:
                return StageUnavailable(self._on_death(c, *dead))
            if time.monotonic() > end:
                return None
            await asyncio.sleep(0.02)

    async def _hop(self, stage: str, work: Work) -> Result:
        t0 = time.monotonic()
        sent = False
        try:
            c = await self._pick(stage, work.deadline)
            work.sent_at = time.time()
            fut = await c.submit(work)
            sent = True
            try:
                res = await asyncio.wait_for(asyncio.shield(fut), max(0.0, work.deadline - time.time()))
            except asyncio.TimeoutError:
                holder = getattr(c, "waiting_for", lambda: "")()  # the replica waits for the node's compute turn
                why = (f" (waiting for the node's compute turn, which {holder} holds; cpu_sharing = 'exclusive')"
                       if holder else "")
                raise DeadlineExceeded(f"the request exceeded request_timeout_s="
                                       f"{self.cfg.server.request_timeout_s:g} in stage {stage}{why}") from None
            finally:
                if not fut.done():  # abandoned while the stage has it: tell the stage
                    await c.cancel(work)
            if not res.ok and not res.user_error:
                died = await self._dead_rank_of(c)
                if died is not None:
                    raise died
        except BaseException as e:
            # A live driver that got the work releases its inputs itself (after running or dropping it);
            # otherwise nobody else will release the previous stage's output.
            if work.inputs is not None and (not sent or isinstance(e, StageUnavailable)):
                with contextlib.suppress(Exception):
                    tensor_handoff.release(work.inputs)
            if isinstance(e, ServingError):
                self.metrics.errors.labels(stage=stage, kind=e.code).inc()
            raise
        self.metrics.stage_latency.labels(stage=stage).observe(time.monotonic() - t0)
        if res.first_in_batch and res.ok:  # once per batch: its size and its compute time
            self.metrics.batch_size.labels(stage=stage).observe(res.batch_size)
            self.metrics.compute.labels(stage=stage).observe(res.compute_s)
        if res.ok:
            self.metrics.queue_wait.labels(stage=stage).observe(res.queue_s)
        else:
            if res.user_error:
                raise BadRequestInStage(f"stage {stage} rejected the request: {res.error}")
            self.metrics.errors.labels(stage=stage, kind="stage_failed").inc()
            raise StageFailed(f"stage {stage} failed: {res.error}")
        return res
