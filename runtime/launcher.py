"""Start, watch and stop the rank processes of every stage replica, as the :class:`~runtime.placement.Placement` says.

:class:`StageLauncher` is the small interface the orchestrator needs (start a replica, tell a dead rank and its
node, kill, stop, shut down); :class:`LocalLauncher` implements it for ranks on this node, and
``runtime.ray_launcher.RayLauncher`` (``[placement] launcher = "ray"``) the same methods over the same placement
for ranks on any node of a Ray cluster. ``runtime.stage_client.make_launcher`` makes the one the config names.

:class:`LocalLauncher`:

- sweeps what dead runtime instances left (``comm.cleanup.sweep_dead``: run directories, shm segments) before
  anything starts;
- gives the instance an id (exported as ``OMNI_RUNTIME_INSTANCE`` so every shm segment of this runtime shares a
  prefix) and its 0700 run directory (ipc sockets, rendezvous stores), owned by this process;
- starts each replica as ``world_size`` processes from a ``forkserver`` context (``runtime.rank_forkserver``: the
  forkserver imports torch and transformers'/diffusers' model loading once, ``serve`` starts it while the frontend
  imports its own modules; a plain fork after torch has run threads can deadlock; it starts with the OpenMP
  settings of ``runtime.cores.omp_env``), each with the
  replica's environment from the placement (``GLOO_SOCKET_IFNAME=lo`` on one node), glibc's allocator set to keep
  freed activation memory (``runtime.allocator``) and a parent watchdog that unlinks the rank's segments and
  exits it when the frontend dies;
- kills a replica's whole process tree (``comm.processes.kill_tree``) and sweeps its segments; at shutdown,
  sweeps every segment of the instance and removes the run directory.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Protocol

import msgspec

from omni_runtime.comm import cleanup, shm_tensor
from omni_runtime.comm import instance as rt_instance
from omni_runtime.comm.processes import kill_tree, pid_alive
from omni_runtime.runtime import allocator, cores, rank_forkserver
from omni_runtime.runtime.config import STAGE_NAMES, ConfigError, RuntimeConfig
from omni_runtime.runtime.placement import Placement, ReplicaPlacement, compute_placement
from omni_runtime.runtime.stage_worker import WorkerSpec, worker_main

logger = logging.getLogger(__name__)

_CTX = rank_forkserver.CTX


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- what a replica or an instance leaves on this host: one place for both launchers (this one and Ray's) -----


def clear_file_store(rendezvous: str) -> None:
    """Unlink the file of a ``file://`` rendezvous store (a FileStore must start empty; a killed replica's is
    stale); any other rendezvous has no file."""
    if rendezvous.startswith("file://"):
        Path(rendezvous[len("file://"):]).unlink(missing_ok=True)


def release_replica(instance: str, label: str, pids: list[int], place: ReplicaPlacement, generation: int) -> None:
    """After a replica's ranks died or were killed: unlink the shm segments those ``pids`` created and the file
    store of its ``generation`` (0: never started)."""
    if pids:
        swept = shm_tensor.sweep(shm_tensor.instance_prefix(instance), pids=pids)
        if swept:
            logger.info("swept %d shm segment(s) of %s", len(swept), label)
    if generation:
        clear_file_store(place.rendezvous(generation))


def release_instance(instance: str, run_dir: Path) -> None:
    """At shutdown, once every replica stopped: unlink every segment of the instance, remove its run directory."""
    swept = shm_tensor.sweep(shm_tensor.instance_prefix(instance), include_live=True)
    if swept:
        logger.info("swept %d leftover shm segment(s)", len(swept))
    shutil.rmtree(run_dir, ignore_errors=True)


def _rank_main(spec_bytes: bytes, env: dict[str, str], parent_pid: int) -> None:
    """Entry point of a rank process: the placement's environment, the parent watchdog, the allocator settings
    (``runtime.allocator``), then the worker."""
    os.environ.update(env)
    cleanup.exit_with_parent(parent_pid)
    allocator.keep_freed_memory()
    worker_main(spec_bytes)


class StageLauncher(Protocol):
    """What the orchestrator needs from a launcher, whatever starts the processes."""

    placement: Placement

    def start_replica(self, stage: str, replica: int) -> str:
        """Start (or restart) every rank of a replica; returns its driver's work endpoint."""
        ...

    def dead_rank(self, stage: str, replica: int) -> tuple[int, int | None] | None:
        """(rank, exit code) of the first rank of the replica that is gone, or None while all run."""
        ...

    def rank_node(self, stage: str, replica: int, rank: int) -> str:
        """The node a rank of the replica runs on."""
        ...

    def kill(self, stage: str, replica: int) -> None: ...

    def stop(self, stage: str, replica: int, timeout: float) -> None: ...

    def shutdown(self, timeout: float = 5.0) -> None: ...


class ReplicaProcs:
    """The rank processes of one replica of one stage, on this node."""

    def __init__(self, launcher: LocalLauncher, place: ReplicaPlacement) -> None:
        self.launcher, self.place = launcher, place
        self.stage, self.replica = place.stage, place.replica
        self.procs: list[mp.process.BaseProcess] = []
        self.generation = 0

    @property
    def label(self) -> str:
        return self.place.label

    @property
    def in_addr(self) -> str:
        return self.place.work_endpoint(self.generation)

    def specs(self) -> list[WorkerSpec]:
        """The spec of every rank for the current generation (what :meth:`start` hands each process)."""
        cfg = self.launcher.cfg
        st = cfg.stages.get(self.stage)
        ws = self.place.world_size
        # the stage's ParallelSpec with its config key names; the worker converts it back (stage_worker)
        parallel = msgspec.to_builtins(getattr(st, "parallel", None) or {})
        threads = cores.stage_threads(ws, cores.cpus(), st.threads)
        nxt = STAGE_NAMES.index(self.stage) + 1
        pool = nxt < len(STAGE_NAMES) and cfg.stages.get(STAGE_NAMES[nxt]).world_size == 1
        rendezvous = self.place.rendezvous(self.generation)
        port = free_port() if ws > 1 and not rendezvous.startswith("file://") else 0
        if port:
            rendezvous = rendezvous.replace(":*", f":{port}")
        return [WorkerSpec(
            stage=self.stage, replica=self.replica, rank=rk.rank, world_size=ws, master_port=port,
            model_path=cfg.model.path, dtype=cfg.model.dtype, device=rk.device,
            in_addr=self.in_addr, out_addr=self.launcher.result_addr,
            max_batch_size=st.max_batch_size, batch_timeout_ms=st.batch_timeout_ms,
            max_batch_pixels=st.max_batch_pixels,
            instance=self.launcher.instance, parent_pid=os.getpid(), parallel=parallel, threads=threads,
            pool_outputs=pool and self.place.tensor_transport == "shm",
            vae_tiling=self.stage == "vae" and cfg.stages.vae.tiling,
            scheduling=cfg.stages.denoiser.scheduling, batch_invariant=cfg.stages.denoiser.batch_invariant,
            priority_aging_s=cfg.stages.denoiser.priority_aging_s,
            mixed_sizes=self.stage == "denoiser" and cfg.stages.denoiser.mixed_sizes,
            max_padding_waste=cfg.stages.denoiser.max_padding_waste, cpu_linear=cfg.stages.denoiser.cpu_linear,
            compile=cfg.stages.denoiser.compile,
            lora_max_loaded=cfg.lora.max_loaded,
            lora_adapters=dict(cfg.lora.adapters) if self.stage == "denoiser" else {},
            log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
            rendezvous=rendezvous, local_rank=rk.local_rank, node=rk.node,
            tensor_transport=self.place.tensor_transport,
            tensor_endpoint=self.place.tensor_endpoint(self.generation),
            compute_token=self.launcher.compute_token if rk.device == "cpu" else "",
            generation=self.generation, stall_timeout_s=cfg.server.stall_timeout_s,
        ) for rk in self.place.ranks]

    def start(self) -> None:
        self.generation += 1
        clear_file_store(self.place.rendezvous(self.generation))
        env = {**self.place.env, rt_instance.INSTANCE_ENV: self.launcher.instance}
        rank_forkserver.start_forkserver(self.launcher.budget.omp)
        self.procs = []
        for spec in self.specs():
            p = _CTX.Process(target=_rank_main, args=(msgspec.msgpack.encode(spec), env, os.getpid()),
                             name=f"{self.label}-rank{spec.rank}", daemon=True)
            p.start()
            self.procs.append(p)
        logger.info("started %s (generation %d): pids %s", self.label, self.generation, [p.pid for p in self.procs])

    def rank_node(self, rank: int) -> str:
        """The node rank ``rank`` runs on (named in the error when it dies)."""
        return self.place.ranks[rank].node

    def dead_rank(self) -> tuple[int, int | None] | None:
        """(rank, exit code) of the first rank process that is gone, or None while all run."""
        for r, p in enumerate(self.procs):
            if p.exitcode is not None or p.pid is None or not pid_alive(p.pid):
                if p.exitcode is None and p.pid is not None:
                    p.join(timeout=0.5)  # a zombie: reap it for its exit code (-9: SIGKILL)
                return r, p.exitcode
        return None

    def kill(self) -> None:
        """SIGKILL every rank (and anything they started), reap them, sweep their shm segments and store."""
        kill_tree([p.pid for p in self.procs])
        for p in self.procs:
            p.join(timeout=5)
        release_replica(self.launcher.instance, self.label, [p.pid for p in self.procs if p.pid is not None],
                        self.place, self.generation)

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a graceful exit (after a Stop message), then kill."""
        end = time.monotonic() + timeout
        for p in self.procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
        self.kill()


class ReplicaLauncher:
    """The :class:`StageLauncher` methods that act on one replica, delegated to its ``ReplicaProcs`` (or a subclass:
    the Ray launcher's replicas) in ``self.replicas[stage][replica]``; both launchers share them."""

    replicas: dict[str, list[ReplicaProcs]]
    compute_token: str = ""  # the turn file of the CPU drivers on this node ("": none; runtime.cores)

    def _procs(self, stage: str, replica: int) -> ReplicaProcs:
        return self.replicas[stage][replica]

    def start_replica(self, stage: str, replica: int) -> str:
        r = self._procs(stage, replica)
        r.start()
        return r.in_addr

    def dead_rank(self, stage: str, replica: int) -> tuple[int, int | None] | None:
        return self._procs(stage, replica).dead_rank()

    def rank_node(self, stage: str, replica: int, rank: int) -> str:
        return self._procs(stage, replica).rank_node(rank)

    def kill(self, stage: str, replica: int) -> None:
        self._procs(stage, replica).kill()

    def stop(self, stage: str, replica: int, timeout: float) -> None:
        self._procs(stage, replica).stop(timeout)

    def start_all(self) -> None:
        for reps in self.replicas.values():
            for r in reps:
                r.start()


class LocalLauncher(ReplicaLauncher):
    """All replicas of all stages of one runtime instance, on this node (implements :class:`StageLauncher`)."""

    _count = 0

    def __init__(self, cfg: RuntimeConfig) -> None:
        self.cfg = cfg
        cleanup.sweep_dead()
        # Every launcher gets its own instance id (children get it through their environment), so the final sweep
        # of one runtime never touches the segments of another one living in the same process or shell.
        # ``OMNI_RUNTIME_INSTANCE`` in the environment, if set, is used as the id's prefix.
        LocalLauncher._count += 1
        base = os.environ.get(rt_instance.INSTANCE_ENV) or f"rt{os.getpid()}"
        self.instance = f"{base}-{LocalLauncher._count}.{secrets.token_hex(2)}"
        self.run_dir = rt_instance.run_dir(self.instance)
        self.placement = compute_placement(cfg, str(self.run_dir))
        if len(self.placement.nodes) > 1:
            raise ConfigError(f"the placement spans nodes {self.placement.nodes}; the local launcher starts "
                              f"processes on this node ({self.placement.frontend_node}) only")
        self.result_addr = self.placement.result_endpoint
        self.budget = cores.core_budget(cfg, self.placement)
        logger.info("%s", self.budget.format())
        #: ``cpu_sharing = "exclusive"``: the turn every CPU replica's driver takes to compute (runtime.cores)
        self.compute_token = str(self.run_dir / "compute.token") if self.budget.exclusive else ""
        self.replicas: dict[str, list[ReplicaProcs]] = {
            s: [ReplicaProcs(self, rp) for rp in self.placement.of_stage(s)] for s in STAGE_NAMES}
        self.total_ranks = self.placement.total_ranks

    def shutdown(self, timeout: float = 5.0) -> None:
        for reps in self.replicas.values():
            for r in reps:
                r.stop(timeout)
        release_instance(self.instance, self.run_dir)

