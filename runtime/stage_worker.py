"""The main function of one rank process of a stage replica.

Rank 0 (the driver) pulls :class:`~runtime.messages.Work` from its ZMQ socket, forms batches (same batch key, up to
``max_batch_size``, waiting at most ``batch_timeout_ms`` after the first item), hands each batch to the other
ranks (:mod:`runtime.rank_fanout`), runs it, and pushes one :class:`~runtime.messages.Result` per item back to the
orchestrator. The other ranks run the same batches so their collectives pair up. The driver announces
:class:`~runtime.messages.Ready` once every rank has loaded its weights.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import deque

import msgspec

logger = logging.getLogger(__name__)


class WorkerSpec(msgspec.Struct, kw_only=True):
    stage: str
    replica: int
    rank: int
    world_size: int
    master_port: int
    model_path: str
    dtype: str
    device: str
    in_addr: str            # the driver binds its work socket here
    out_addr: str           # the orchestrator's result socket
    max_batch_size: int
    batch_timeout_ms: float
    instance: str
    parent_pid: int
    parallel: dict[str, int]
    threads: int = 1
    pool_outputs: bool = False  # publish through a ShmPool (the next stage has one rank, the sole reader)
    log_level: str = "INFO"
    # From the Placement (runtime/placement.py); defaults keep older callers working.
    rendezvous: str = ""            # torch.distributed init_method ("file://<run dir>/..." on one node)
    local_rank: int = -1            # index on its node (-1: same as rank)
    node: str = ""                  # the node it runs on
    tensor_transport: str = "shm"   # how this replica's outputs reach the next stage: "shm" | "frames"
    tensor_endpoint: str = ""       # "frames": where the output rank's tensor server binds


def title(spec: WorkerSpec) -> str:
    return f"omni-runtime: {spec.stage}[{spec.replica}] rank {spec.rank}/{spec.world_size}"


def _watch_parent(parent_pid: int) -> None:
    # A rank must never outlive the frontend that launched it (no orphans, even after a SIGKILL of the frontend).
    while True:
        time.sleep(0.5)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(0)


def _init_distributed(spec: WorkerSpec):
    """Build this rank's :class:`~parallel.mesh.Mesh` (torch.distributed included; the backend follows the device:
    nccl for CUDA, gloo for CPU) from the stage's parallel degrees. Returns the mesh."""
    import msgspec as _msgspec
    import torch

    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec

    pspec = _msgspec.convert(spec.parallel, ParallelSpec)
    pspec.check_world_size(spec.world_size)
    device = torch.device(spec.device if spec.device != "cuda" else f"cuda:{spec.rank}")
    init = spec.rendezvous or f"tcp://127.0.0.1:{spec.master_port}"
    return Mesh.build(pspec, spec.rank, init, device)


def _collective_failed(e: BaseException) -> bool:
    """Whether ``e`` is a torch.distributed collective failing because a peer went away (gloo raises a plain
    RuntimeError naming its transport; NCCL a DistBackendError).

    Stopgap of this (old) worker only: the process shell (runtime/stage_shell.py + the orchestrator's
    ``_dead_rank_of``) reports a failed batch whose replica lost a rank as 503 itself; this goes with this file."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, dist.DistError) or ("gloo" in text and ("Connection" in text or "Read error" in text))


def worker_main(spec_bytes: bytes) -> None:
    """Entry point of a rank process (``multiprocessing`` target); ``spec_bytes`` is a msgspec-encoded spec."""
    spec = msgspec.msgpack.decode(spec_bytes, type=WorkerSpec)
    # Ctrl-C in a terminal reaches the whole process group; the frontend decides how the stages stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["OMNI_RUNTIME_INSTANCE"] = spec.instance
    name = title(spec)
    try:
        import setproctitle

        setproctitle.setproctitle(name)
    except ImportError:  # pragma: no cover - it is a dependency
        pass
    logging.basicConfig(level=spec.log_level, force=True, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s")
    threading.Thread(target=_watch_parent, args=(spec.parent_pid,), daemon=True).start()

    import torch

    torch.set_num_threads(max(1, spec.threads))
    mesh = _init_distributed(spec) if spec.world_size > 1 else None

    from omni_runtime.comm import shm_tensor
    from omni_runtime.runtime.rank_fanout import RankFanout
    from omni_runtime.runtime.stage_exec import EXECUTORS

    # HSDP: the stage's weights sharded over the mesh's hsdp_replicate x hsdp_shard groups (None: not sharded)
    hsdp = None
    if mesh is not None and spec.stage in ("text_encoder", "denoiser"):
        from omni_runtime.parallel.hsdp import hsdp_config_from_mesh

        hsdp = hsdp_config_from_mesh(mesh)
    executor = EXECUTORS[spec.stage](spec.model_path, spec.dtype, spec.device, mesh=mesh,
                                     **({"hsdp": hsdp} if hsdp is not None else {}))
    pool = shm_tensor.ShmPool(max_bytes=256 << 20) if spec.pool_outputs and spec.rank == 0 else None
    if pool is not None:
        executor.use_pool(pool)
    fanout = RankFanout(spec.rank, spec.world_size)
    if spec.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    logger.info("loaded; %s", "driver" if spec.rank == 0 else "follower")
    if spec.rank == 0:
        _Driver(spec, executor, fanout).loop()
    else:
        _follow(executor, fanout)
    fanout.close()
    if pool is not None:
        pool.close()
    shm_tensor.shutdown()
    logger.info("stopped")


def _follow(executor, fanout) -> None:
    from omni_runtime.comm.shm_broadcast import MessageQueueCancelled
    from omni_runtime.runtime.messages import Stop

    while True:
        try:
            msg = fanout.recv()
        except MessageQueueCancelled:
            logger.info("the driver is gone; exiting")
            return
        if isinstance(msg, Stop):
            return
        try:
            executor.run(msg.items, publish=False)
        except Exception:
            logger.exception("batch of %d failed on a follower rank", len(msg.items))


class _Driver:
    def __init__(self, spec: WorkerSpec, executor, fanout) -> None:
        import zmq

        from omni_runtime.runtime.messages import Inbound, Outbound

        self.spec, self.executor, self.fanout = spec, executor, fanout
        self.ctx = zmq.Context.instance()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.RCVHWM, 10000)
        self.pull.bind(spec.in_addr)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 2000)
        self.push.setsockopt(zmq.SNDHWM, 10000)
        self.push.connect(spec.out_addr)
        self.poller = zmq.Poller()
        self.poller.register(self.pull, zmq.POLLIN)
        self.dec = msgspec.msgpack.Decoder(Inbound)
        self.enc = msgspec.msgpack.Encoder()
        self._out_type = Outbound
        self.pending: deque = deque()
        self.cancelled: set[str] = set()
        self.stopping = False

    def _send(self, msg) -> None:
        self.push.send(self.enc.encode(msg), copy=False)

    def _handle(self, raw) -> None:
        from omni_runtime.runtime.messages import Cancel, Stop

        try:
            msg = self.dec.decode(raw)
        except msgspec.DecodeError as e:
            logger.error("dropped an undecodable message: %s", e)
            return
        if isinstance(msg, Stop):
            self.stopping = True
        elif isinstance(msg, Cancel):
            self.cancelled.add(msg.req_id)
            if len(self.cancelled) > 100_000:
                self.cancelled.clear()
        else:
            self.pending.append(msg)

    def _recv(self, timeout_ms: float) -> bool:
        if not self.poller.poll(max(0, int(timeout_ms))):
            return False
        while True:  # drain what is there without waiting
            import zmq

            try:
                self._handle(self.pull.recv(zmq.NOBLOCK, copy=False).buffer)
            except zmq.Again:
                return True

    def _take_batch(self) -> list:
        key = self.executor.batch_key(self.pending[0])
        window_end = time.monotonic() + self.spec.batch_timeout_ms / 1000
        while not self.stopping:
            same = sum(1 for w in self.pending if self.executor.batch_key(w) == key)
            left = window_end - time.monotonic()
            if same >= self.spec.max_batch_size or left <= 0:
                break
            self._recv(left * 1000)
        batch, rest = [], deque()
        for w in self.pending:
            if len(batch) < self.spec.max_batch_size and self.executor.batch_key(w) == key:
                batch.append(w)
            else:
                rest.append(w)
        self.pending = rest
        return batch

    def _drop(self, items: list, reason: str) -> None:
        from omni_runtime.comm import shm_tensor
        from omni_runtime.runtime.messages import Result

        for w in items:
            if w.inputs is not None:
                shm_tensor.release(w.inputs)
            self._send(Result(req_id=w.req_id, index=w.index, stage=self.spec.stage, replica=self.spec.replica,
                              ok=False, error=reason))

    def loop(self) -> None:
        from omni_runtime.comm import shm_tensor
        from omni_runtime.runtime.messages import Batch, Ready, Result, Stop

        self._send(Ready(stage=self.spec.stage, replica=self.spec.replica, pids=[os.getpid()]))
        while not self.stopping:
            if not self.pending:
                self._recv(500)
                continue
            batch = self._take_batch()
            now = time.time()
            dead = [w for w in batch if w.req_id in self.cancelled or (w.deadline and now > w.deadline)]
            if dead:
                self._drop(dead, "cancelled or past its deadline")
                batch = [w for w in batch if w not in dead]
            if not batch:
                continue
            self.fanout.send(Batch(items=batch))
            t0 = time.time()
            try:
                outs = self.executor.run(batch, publish=True)
                err, user = "", False
            except Exception as e:
                from omni_runtime.stages.errors import OmniUserError

                if self.spec.world_size > 1 and _collective_failed(e):
                    # A peer rank is gone: this replica's process group is broken for good. Exit, so the
                    # orchestrator's watchdog reports the dead replica (503 naming it) and restarts it, instead of
                    # answering 500 and waiting on a group that can never pair up.
                    logger.error("a collective with the other ranks failed (%s: %s); exiting so the replica is "
                                 "restarted", type(e).__name__, e)
                    os._exit(70)
                user = isinstance(e, OmniUserError)
                if not user:
                    logger.exception("batch of %d failed", len(batch))
                outs, err = [None] * len(batch), f"{type(e).__name__}: {e}"
            dt = time.time() - t0
            for i, (w, out) in enumerate(zip(batch, outs, strict=True)):
                if w.inputs is not None:
                    shm_tensor.release(w.inputs)
                res = Result(req_id=w.req_id, index=w.index, stage=self.spec.stage, replica=self.spec.replica,
                             ok=not err, error=err, user_error=user, batch_size=len(batch),
                             first_in_batch=i == 0, queue_s=max(0.0, t0 - w.sent_at), compute_s=dt)
                if isinstance(out, bytes):
                    res.image = out
                else:
                    res.output = out
                self._send(res)
        self._drop(list(self.pending), "the stage is shutting down")
        self.fanout.send(Stop())
        self.pull.close(linger=0)
        self.push.close()
