"""Start, watch and stop the rank processes of every stage replica.

Each replica is ``world_size`` processes from a ``forkserver`` context (the forkserver imports torch once; a
plain fork after torch has run threads can deadlock), with its own torch.distributed world on a free port. The
launcher exports ``OMNI_RUNTIME_INSTANCE`` so every shm segment of this runtime shares a prefix, and sweeps the
segments of children that died (``comm.shm_tensor.sweep``) and, at shutdown, all of them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

import msgspec
import psutil

from omni_runtime.comm.shm_tensor import pid_alive
from omni_runtime.runtime.config import STAGE_NAMES, RuntimeConfig
from omni_runtime.runtime.layout import device_for
from omni_runtime.runtime.stage_worker import WorkerSpec, worker_main

logger = logging.getLogger(__name__)

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch"])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReplicaProcs:
    """The rank processes of one replica of one stage."""

    def __init__(self, launcher: Launcher, stage: str, replica: int) -> None:
        self.launcher, self.stage, self.replica = launcher, stage, replica
        self.procs: list[mp.process.BaseProcess] = []
        self.generation = 0

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.replica}]"

    @property
    def in_addr(self) -> str:
        return f"ipc://{self.launcher.run_dir}/{self.stage}-{self.replica}-g{self.generation}.in"

    def start(self) -> None:
        cfg = self.launcher.cfg
        st = cfg.stages.get(self.stage)
        ws = st.world_size
        self.generation += 1
        port = free_port()
        parallel = (msgspec.structs.asdict(cfg.stages.get(self.stage).parallel)
                    if self.stage in ("denoiser", "text_encoder")
                    else {"patch": cfg.stages.vae.parallel.patch} if self.stage == "vae" else {})
        threads = stage_threads(ws, _cpus(), st.threads)
        nxt = STAGE_NAMES.index(self.stage) + 1
        pool = nxt < len(STAGE_NAMES) and cfg.stages.get(STAGE_NAMES[nxt]).world_size == 1
        self.procs = []
        for rank in range(ws):
            spec = WorkerSpec(
                stage=self.stage, replica=self.replica, rank=rank, world_size=ws, master_port=port,
                model_path=cfg.model.path, dtype=cfg.model.dtype,
                device=device_for(cfg, self.stage, self.replica * ws + rank),
                in_addr=self.in_addr, out_addr=self.launcher.result_addr,
                max_batch_size=st.max_batch_size, batch_timeout_ms=st.batch_timeout_ms,
                instance=self.launcher.instance, parent_pid=os.getpid(), parallel=parallel, threads=threads,
                pool_outputs=pool,
                log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()))
            p = _CTX.Process(target=worker_main, args=(msgspec.msgpack.encode(spec),),
                             name=f"{self.label}-rank{rank}", daemon=True)
            p.start()
            self.procs.append(p)
        logger.info("started %s: pids %s", self.label, [p.pid for p in self.procs])

    def dead_rank(self) -> tuple[int, int | None] | None:
        """(rank, exit code) of the first rank process that is gone, or None while all run."""
        for r, p in enumerate(self.procs):
            if p.exitcode is not None or p.pid is None or not pid_alive(p.pid):
                return r, p.exitcode
        return None

    def kill(self) -> None:
        """SIGKILL every rank (and anything they started), reap them, sweep their shm segments."""
        from omni_runtime.comm import shm_tensor

        victims = []
        for p in self.procs:
            try:
                ps = psutil.Process(p.pid)
                victims += ps.children(recursive=True) + [ps]
            except (psutil.NoSuchProcess, TypeError):
                pass
        for v in victims:
            try:
                v.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=5)
        for p in self.procs:
            p.join(timeout=5)
        pids = [p.pid for p in self.procs if p.pid is not None]
        swept = shm_tensor.sweep(shm_tensor.instance_prefix(self.launcher.instance), pids=pids)
        if swept:
            logger.info("swept %d shm segment(s) of %s", len(swept), self.label)

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a graceful exit (after a Stop message), then kill."""
        end = time.monotonic() + timeout
        for p in self.procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
        self.kill()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def stage_threads(world_size: int, cpus: int, configured: int = 0) -> int:
    """torch threads of one rank: ``stages.<name>.threads`` when set, else the stage's ranks split every core.

    Every stage gets every core by default: stages mostly run one after another for a request, and on 2 cores
    giving the text encoder and VAE one thread each cost ~50 ms of latency per request while throughput at 16
    clients stayed within the run-to-run noise (docs/BENCHMARKS.md). Under heavy concurrent load the stages'
    OpenMP teams can oversubscribe the cores; then set ``threads`` per stage."""
    if configured > 0:
        return configured
    return max(1, cpus // world_size)


class Launcher:
    """All replicas of all stages of one runtime instance."""

    _count = 0

    def __init__(self, cfg: RuntimeConfig) -> None:
        self.cfg = cfg
        # Every launcher gets its own instance id (children get it through their spec), so the final sweep of
        # one runtime never touches the segments of another one living in the same process or shell.
        # ``OMNI_RUNTIME_INSTANCE`` in the environment, if set, is used as the id's prefix.
        Launcher._count += 1
        base = os.environ.get("OMNI_RUNTIME_INSTANCE") or f"rt{os.getpid()}"
        self.instance = f"{base}-{Launcher._count}.{secrets.token_hex(2)}"
        self.run_dir = Path(tempfile.mkdtemp(prefix="omni-rt-"))
        self.result_addr = f"ipc://{self.run_dir}/results"
        self.replicas: dict[str, list[ReplicaProcs]] = {
            s: [ReplicaProcs(self, s, i) for i in range(cfg.stages.get(s).replicas)] for s in STAGE_NAMES}
        self.total_ranks = sum(cfg.stages.get(s).world_size * cfg.stages.get(s).replicas for s in STAGE_NAMES)

    def start_all(self) -> None:
        for reps in self.replicas.values():
            for r in reps:
                r.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        from omni_runtime.comm import shm_tensor

        for reps in self.replicas.values():
            for r in reps:
                r.stop(timeout)
        swept = shm_tensor.sweep(shm_tensor.instance_prefix(self.instance), include_live=True)
        if swept:
            logger.info("swept %d leftover shm segment(s)", len(swept))
        shutil.rmtree(self.run_dir, ignore_errors=True)
