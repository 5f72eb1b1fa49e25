"""Stage replicas on a Ray cluster: one placement group per replica, one Ray actor per rank (``launcher = "ray"``).

:class:`RayLauncher` implements :class:`~runtime.launcher.StageLauncher` over the same
:class:`~runtime.placement.Placement` as the local launcher, with the nodes Ray chose:

- it connects to Ray (``[placement] ray_address``: ``""`` starts a private instance for this run and stops it at
  shutdown; ``"auto"`` or ``host:port`` joins a cluster), then makes one placement group per replica with one
  bundle per rank (``{"CPU": threads}`` or ``{"GPU": 1}``, plus ``[stages.X] ray_resources``) and the stage's
  ``ray_strategy``, and waits until Ray has placed them all;
- the node of every bundle gives the placement (:func:`runtime.placement.compute_placement` with those nodes):
  endpoints, rendezvous and the tensor road of every hop (shm handles on one node, ZMQ frames across nodes);
- each rank is a :class:`RankShell` actor (``max_restarts=0``) in its bundle: it reports its node, address, pid
  and free tcp ports of its node; the driver's ports fill the replica's ``tcp://<address>:*`` endpoints and its
  tcp rendezvous; then every actor runs the stage process shell (:func:`runtime.stage_worker.worker_main`, the
  same one a local rank process runs) in a long-running ``run`` call;
- a rank is dead when that call's ObjectRef is ready (Ray reports the actor's death, or the shell returned):
  :meth:`RayReplica.dead_rank` is what the orchestrator polls, so a dead actor takes the same path as a dead
  local process (503 naming stage, rank and node; the replica restarts through :meth:`RayLauncher.start_replica`);
- shutdown stops the actors (then kills them), removes every placement group, sweeps the instance's shm
  segments on this node and, for a private instance, stops Ray.

Node identity: a node is a Ray node (named ``<node id[:8]>@<address>``); the actors export their Ray node id as
``OMNI_NODE_ID`` (``comm.node``), so the MessageQueue's local/remote split and the frame transport agree with the
placement even when several Ray nodes share one host (``ray.cluster_utils.Cluster`` in the tests).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
import time
from typing import Any

import msgspec

from omni_runtime.comm import cleanup, shm_tensor
from omni_runtime.comm import instance as rt_instance
from omni_runtime.comm.node import NODE_ID_ENV, boot_id, node_name
from omni_runtime.comm.processes import kill_tree
from omni_runtime.runtime.config import STAGE_NAMES, ConfigError, RuntimeConfig
from omni_runtime.runtime.cores import cpus
from omni_runtime.runtime.launcher import (
    ReplicaLauncher,
    ReplicaProcs,
    clear_file_store,
    release_instance,
    release_replica,
)
from omni_runtime.runtime.placement import Placement, ReplicaPlacement, compute_placement, fill_port
from omni_runtime.runtime.ray_connect import import_ray, probe_ray_address
from omni_runtime.runtime.stage_worker import worker_main

logger = logging.getLogger(__name__)

__all__ = ["NAMESPACE", "RankShell", "RayLauncher", "RayReplica", "ray_placement"]

NAMESPACE = "omni-runtime"
HOST_IP_ENV = "OMNI_HOST_IP"  # where a MessageQueue writer's remote readers connect (comm.shm_broadcast)
PLACE_TIMEOUT_S = 120.0       # Ray placing the placement groups
ACTOR_TIMEOUT_S = 180.0       # a rank actor starting and reporting (a fresh Python process on a loaded node)
KILL_WAIT_S = 10.0


# ----------------------------------------------------------------------------------------------- the rank actor


def _free_ports(ip: str, n: int) -> list[int]:
    """``n`` distinct free tcp ports of this node on ``ip`` (bound together, then released for the shell)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((ip, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class RankShell:
    """The Ray actor of one rank (made remote by the launcher): reports where it runs, then runs the stage
    process shell, :func:`runtime.stage_worker.worker_main`, in :meth:`run` until the replica stops."""

    def __init__(self, env: dict[str, str]) -> None:
        import ray

        os.environ.update(env)
        self.node_id: str = ray.get_runtime_context().get_node_id()
        self.ip: str = ray.util.get_node_ip_address()
        os.environ[NODE_ID_ENV] = self.node_id   # comm.node: this Ray node is this rank's node
        os.environ[HOST_IP_ENV] = self.ip        # the MessageQueue's remote readers connect here
        instance = env.get(rt_instance.INSTANCE_ENV)
        if instance:  # what a killed predecessor on this node left (its pid is gone)
            shm_tensor.sweep(shm_tensor.instance_prefix(instance))

    def info(self, n_ports: int) -> dict[str, Any]:
        """Where this rank runs: Ray node id, node address, pid, host identity, and ``n_ports`` free ports."""
        return {"node_id": self.node_id, "ip": self.ip, "pid": os.getpid(), "host": f"{node_name()}|{boot_id()}",
                "ports": _free_ports(self.ip, n_ports)}

    def run(self, spec_bytes: bytes) -> int:
        """The stage process shell (returns when the replica is told to stop)."""
        worker_main(spec_bytes)
        return 0


# ----------------------------------------------------------------------------------------------- a replica


def _node_label(node_id: str, ip: str) -> str:
    return f"{node_id[:8]}@{ip}"


class RayReplica(ReplicaProcs):
    """The rank actors of one replica, in its placement group. Same surface as the local ``ReplicaProcs``."""

    def __init__(self, launcher: RayLauncher, place: ReplicaPlacement, pg: Any, bundle: dict[str, float],
                 threads: int) -> None:
        super().__init__(launcher, place)  # type: ignore[arg-type]
        self.ray_launcher = launcher
        self.pg, self.bundle, self.threads = pg, bundle, threads
        self.actors: list[Any] = []
        self.runs: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self._ports: list[int] = [0, 0, 0]
        self._exit: dict[int, int | None] = {}

    @property
    def in_addr(self) -> str:
        return self.place.work_endpoint(self.generation, self._ports[0])

    @property
    def pids(self) -> list[int]:
        return [i["pid"] for i in self.infos]

    def rank_node(self, rank: int) -> str:
        return self.place.ranks[rank].node

    def specs(self) -> list[Any]:
        gen, (work, tensors, store) = self.generation, self._ports
        rendezvous = self.place.rendezvous(gen, store)
        return [msgspec.structs.replace(
            s, in_addr=self.place.work_endpoint(gen, work), tensor_endpoint=self.place.tensor_endpoint(gen, tensors),
            rendezvous=rendezvous, master_port=store if rendezvous.startswith("tcp://") else 0,
            threads=self.threads, parent_pid=0) for s in super().specs()]

    def _actor_options(self, rank: int) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        res = {k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU")}
        inst = self.ray_launcher.instance
        return dict(
            num_cpus=self.bundle.get("CPU", 0), num_gpus=self.bundle.get("GPU", 0), resources=res or None,
            max_restarts=0, max_task_retries=0, max_concurrency=1, namespace=NAMESPACE,
            name=f"omni-{inst}-{self.stage}-{self.replica}-r{rank}-g{self.generation}",
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank))

    def start(self) -> None:
        ray = self.ray_launcher.ray
        self.generation += 1
        self._exit = {}
        env = {**self.place.env, rt_instance.INSTANCE_ENV: self.ray_launcher.instance}
        actor_cls = self.ray_launcher.actor_cls
        self.actors = [actor_cls.options(**self._actor_options(r)).remote(env) for r in range(self.place.world_size)]
        try:
            self.infos = ray.get([a.info.remote(3 if r == 0 else 0) for r, a in enumerate(self.actors)],
                                 timeout=ACTOR_TIMEOUT_S)
        except BaseException:
            self._kill_actors()
            raise
        for rk, info in zip(self.place.ranks, self.infos, strict=True):
            if _node_label(info["node_id"], info["ip"]) != rk.node:  # Ray moved the bundle (a node was lost)
                logger.warning("%s rank %d runs on %s, the placement says %s", self.label, rk.rank,
                               _node_label(info["node_id"], info["ip"]), rk.node)
        self._ports = list(self.infos[0]["ports"])
        clear_file_store(self.place.rendezvous(self.generation))
        self.runs = [a.run.remote(msgspec.msgpack.encode(spec)) for a, spec in zip(self.actors, self.specs(), strict=True)]
        logger.info("started %s (generation %d) as Ray actors: %s", self.label, self.generation,
                    ", ".join(f"rank {r} pid {i['pid']} on {self.rank_node(r)}" for r, i in enumerate(self.infos)))

    def dead_rank(self) -> tuple[int, int | None] | None:
        """(rank, exit code) of the first rank whose ``run`` call ended (the actor died: code None), or None."""
        if not self.runs:
            return None
        ray = self.ray_launcher.ray
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        if not done:
            return None
        for rank, ref in enumerate(self.runs):
            if ref in done:
                if rank not in self._exit:
                    try:
                        self._exit[rank] = ray.get(ref, timeout=0)
                    except ray.exceptions.RayActorError:
                        self._exit[rank] = None
                    except Exception:  # the shell raised
                        self._exit[rank] = 1
                return rank, self._exit[rank]
        return None

    def _kill_actors(self) -> None:
        ray = self.ray_launcher.ray
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception as e:  # already gone
                logger.debug("ray.kill: %s", e)
        if self.runs:
            ray.wait(self.runs, num_returns=len(self.runs), timeout=KILL_WAIT_S)
        self.actors, self.runs = [], []

    def kill(self) -> None:
        """Kill every rank actor, then sweep what they left on this host (shm segments, the file store). The ranks
        on this host that are stopped (SIGSTOP: hung) are SIGKILLed first: they cannot answer Ray's own kill request."""
        infos = self.infos
        here = f"{node_name()}|{boot_id()}"
        pids = [i["pid"] for i in infos if i.get("host") == here]
        stopped = [p for p in pids if _stopped(p)]
        if stopped:
            kill_tree(stopped)
        self._kill_actors()
        if pids:
            deadline = time.monotonic() + KILL_WAIT_S  # Ray reports the death before the process is reaped
            while any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
        release_replica(self.ray_launcher.instance, self.label, pids, self.place, self.generation)

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the shells to return (after a Stop message), then kill."""
        if self.runs:
            self.ray_launcher.ray.wait(self.runs, num_returns=len(self.runs), timeout=max(0.0, timeout))
        self.kill()


def _stopped(pid: int) -> bool:
    """True if ``pid`` runs on this host and is stopped (SIGSTOP, or traced)."""
    import psutil

    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return False


def _alive(pid: int) -> bool:
    from omni_runtime.comm.processes import pid_alive

    return pid_alive(pid)


# ----------------------------------------------------------------------------------------------- the launcher


def _bundle(cfg: RuntimeConfig, stage: str) -> tuple[dict[str, float], int]:
    """One rank's bundle (CPUs = its threads, or one GPU; plus the stage's ray_resources) and its threads."""
    st = cfg.stages.get(stage)
    threads = st.threads if st.threads > 0 else 1
    bundle: dict[str, float] = {"GPU": 1} if cfg.model.device == "cuda" else {"CPU": threads}
    bundle.update(st.ray_resources)
    return bundle, threads


class RayLauncher(ReplicaLauncher):
    """All replicas of all stages of one runtime instance, as Ray actors (implements ``StageLauncher``).

    Constructing it connects to Ray and places every replica (placement groups); ranks start with
    :meth:`start_replica`. :func:`ray_placement` is the same without starting anything (``check``)."""

    _count = 0

    def __init__(self, cfg: RuntimeConfig) -> None:
        self.cfg = cfg
        self.ray = import_ray()
        self.owned = False
        self.pgs: dict[tuple[str, int], Any] = {}
        self.replicas: dict[str, list[ReplicaProcs]] = {s: [] for s in STAGE_NAMES}
        cleanup.sweep_dead()
        RayLauncher._count += 1
        base = os.environ.get(rt_instance.INSTANCE_ENV) or f"rt{os.getpid()}"
        self.instance = f"{base}-r{RayLauncher._count}.{secrets.token_hex(2)}"
        self.run_dir = rt_instance.run_dir(self.instance)
        try:
            t0 = time.monotonic()
            self._connect()
            self.connect_s = time.monotonic() - t0
            self.actor_cls = self.ray.remote(RankShell)
            self.placement = self._place()
        except BaseException:
            self.shutdown()
            raise
        logger.info("Ray placed every replica:\n%s", self.placement.format())
        ip = self.placement.address(self.placement.frontend_node)
        self.result_addr = fill_port(self.placement.result_endpoint, _free_ports(ip, 1)[0])
        for rep in self.placement.replicas:
            bundle, threads = _bundle(cfg, rep.stage)
            self.replicas[rep.stage].append(
                RayReplica(self, rep, self.pgs[(rep.stage, rep.replica)], bundle, threads))
        self.total_ranks = self.placement.total_ranks

    # --------------------------------------------------------------------------------------- connect and place

    def _connect(self) -> None:
        ray, address = self.ray, self.cfg.placement.ray_address
        if ray.is_initialized():  # this process is already a driver (a test, an embedding application)
            logger.info("using the Ray connection this process already has")
            return
        kwargs: dict[str, Any] = {"namespace": NAMESPACE, "logging_level": logging.WARNING,
                                  "include_dashboard": False}
        if address == "":
            # one node for this run: every rank's bundle fits, and the custom resources the config asks for exist
            need_cpu, custom = 0.0, {}
            for stage in STAGE_NAMES:
                st = self.cfg.stages.get(stage)
                bundle, _ = _bundle(self.cfg, stage)
                n = st.replicas * st.world_size
                need_cpu += bundle.get("CPU", 0) * n
                for k, v in bundle.items():
                    if k not in ("CPU", "GPU"):
                        custom[k] = custom.get(k, 0) + v * n
            # "local": always a new instance, never a cluster this machine happens to run
            kwargs.update(address="local", num_cpus=int(max(cpus(), need_cpu)), resources=custom or None)
        else:
            probe_ray_address(address)
            kwargs.pop("include_dashboard")
            kwargs["address"] = address
        # ray.init makes SIGTERM exit the process at once; the frontend's own handler (serve: uvicorn's graceful
        # shutdown, which stops the stages) must stay in charge
        main = threading.current_thread() is threading.main_thread()
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"placement.ray_address = {address!r}: cannot connect to Ray ({first})") from None
        finally:
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)
        self.owned = True
        logger.info("connected to Ray (%s): %s", "private instance" if address == "" else address,
                    self.ray.cluster_resources())

    def _place(self) -> Placement:
        """One placement group per replica; wait until Ray placed them; the placement with their nodes."""
        ray = self.ray
        from ray.util.placement_group import placement_group, placement_group_table

        for stage in STAGE_NAMES:
            st = self.cfg.stages.get(stage)
            bundle, _ = _bundle(self.cfg, stage)
            for rep in range(st.replicas):
                self.pgs[(stage, rep)] = placement_group(
                    [dict(bundle) for _ in range(st.world_size)], strategy=st.ray_strategy,
                    name=f"omni-{self.instance}-{stage}-{rep}")
        deadline = time.monotonic() + PLACE_TIMEOUT_S
        for (stage, rep), pg in self.pgs.items():
            ready, _ = ray.wait([pg.ready()], timeout=max(0.1, deadline - time.monotonic()))
            if not ready:
                st = self.cfg.stages.get(stage)
                bundle, _ = _bundle(self.cfg, stage)
                raise ConfigError(
                    f"stages.{stage}.ray_resources = {st.ray_resources!r} (ray_strategy {st.ray_strategy!r}): Ray "
                    f"could not place replica {rep}'s {st.world_size} bundle(s) of {bundle} within "
                    f"{PLACE_TIMEOUT_S:g}s; the cluster has {ray.available_resources()} available")
        labels = {n["NodeID"]: _node_label(n["NodeID"], n["NodeManagerAddress"]) for n in ray.nodes() if n["Alive"]}
        addresses = {labels[n["NodeID"]]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        nodes: dict[str, list[str]] = {s: [] for s in STAGE_NAMES}
        for (stage, _rep), pg in self.pgs.items():
            table = placement_group_table(pg)["bundles_to_node_id"]
            nodes[stage] += [labels[table[i]] for i in range(len(table))]
        frontend = labels[ray.get_runtime_context().get_node_id()]
        gpu = self.cfg.model.device == "cuda"
        devices = {s: ["cuda:0" if gpu else "cpu"] * len(nodes[s]) for s in STAGE_NAMES}  # Ray sets CUDA_VISIBLE
        return compute_placement(self.cfg, str(self.run_dir), nodes, addresses=addresses, frontend=frontend,
                                 devices=devices)

    # --------------------------------------------------------------------------------------- StageLauncher

    def report(self) -> dict[str, Any]:
        """Where every rank runs and how each stage's outputs travel (for ``check``, tests and operators)."""
        return {
            "frontend": self.placement.frontend_node,
            "replicas": [{"stage": r.stage, "replica": r.replica, "tensor_transport": r.place.tensor_transport,
                          "ranks": [{"rank": rk.rank, "node": rk.node,
                                     "pid": r.infos[rk.rank]["pid"] if rk.rank < len(r.infos) else None}
                                    for rk in r.place.ranks]}
                         for reps in self.replicas.values() for r in reps]}

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every replica, remove every placement group, sweep this host, stop a private Ray instance."""
        for reps in self.replicas.values():
            for r in reps:
                try:
                    r.stop(timeout)
                except Exception:
                    logger.exception("stopping %s", r.label)
        if self.ray.is_initialized():
            from ray.util.placement_group import remove_placement_group

            for pg in self.pgs.values():
                try:
                    remove_placement_group(pg)
                except Exception as e:
                    logger.debug("remove_placement_group: %s", e)
        self.pgs = {}
        release_instance(self.instance, self.run_dir)
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()  # a private instance stops with it; a joined cluster is only disconnected
        self.owned = False


def ray_placement(cfg: RuntimeConfig) -> tuple[Placement, float]:
    """What ``check`` prints for ``launcher = "ray"``: connect, place every replica, read the nodes, remove the
    placement groups (no rank starts). Returns the placement and the seconds connecting took."""
    launcher = RayLauncher(cfg)
    try:
        return launcher.placement, launcher.connect_s
    finally:
        launcher.shutdown()
