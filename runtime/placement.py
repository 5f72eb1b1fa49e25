"""Where every rank of every stage replica runs and how the processes reach each other: the ``Placement``.

One function, :func:`compute_placement`, turns a config into the placement; ``omni-runtime check`` prints it
(:meth:`Placement.format`) and the launcher starts exactly what it says, so the two can never disagree.

For every replica: the node and device of each rank, its local rank on its node and its parallel groups (the
group arithmetic of :mod:`runtime.layout`); the driver's work endpoint; the torch.distributed rendezvous
(``init_method``); the environment its ranks need; how its output tensors reach the next stage.

Addresses follow one rule: **nothing of ours listens on a non-loopback address on one node.**

- endpoints: ``ipc://`` sockets in the instance's 0700 run directory when the peers share a node, ``tcp://`` on
  the node's address when they do not (``tcp://host:*``: the binder picks a free port and reports it);
- rendezvous: a ``file://`` store in the run directory when all ranks of the replica share a node (no socket at
  all), else ``tcp://<driver node>:*`` (a TCP store on the driver's address, port chosen when it starts);
- gloo's (and NCCL's) own pair sockets bind the loopback interface on one node (``GLOO_SOCKET_IFNAME=lo``,
  ``NCCL_SOCKET_IFNAME=lo``);
- tensors between stages: shared-memory handles when producer and consumer share a node, zero-copy ZMQ frames
  (:mod:`comm.frame_transport`) when they do not, or as forced by ``[placement] tensor_transport`` or the
  environment variable ``OMNI_TENSOR_TRANSPORT`` (for tests).

Endpoints and stores that must be fresh after a restart carry ``{generation}``: use
:meth:`ReplicaPlacement.work_endpoint` and :meth:`ReplicaPlacement.rendezvous`.

Across nodes a launcher fills the ``*`` of a ``tcp://<address>:*`` template with a port its process on that node
reported (:func:`fill_port`; the Ray launcher's rank actors report free ports of their node). Node names and
addresses may differ (``addresses``): Ray names a node by its id, and several Ray nodes may share one address.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import msgspec

from omni_runtime.comm.node import node_name
from omni_runtime.runtime.config import STAGE_NAMES, TENSOR_TRANSPORTS, ConfigError, RuntimeConfig
from omni_runtime.runtime.layout import rank_groups, shown_groups

logger = logging.getLogger(__name__)

__all__ = ["TRANSPORT_ENV", "Placement", "RankPlacement", "ReplicaPlacement", "compute_placement", "device_for",
           "fill_port"]

TRANSPORT_ENV = "OMNI_TENSOR_TRANSPORT"
"""Environment override of ``[placement] tensor_transport`` ("auto", "shm" or "frames"), for tests."""


class RankPlacement(msgspec.Struct, frozen=True, kw_only=True):
    rank: int                       # rank in the replica's torch.distributed world
    local_rank: int                 # index among the replica's ranks on the same node
    node: str                       # node name (host name or address)
    device: str                     # "cpu" or "cuda:N" (N on that node)
    groups: dict[str, list[int]]    # group name -> ranks of the group this rank belongs to


class ReplicaPlacement(msgspec.Struct, frozen=True, kw_only=True):
    stage: str
    replica: int
    world_size: int
    node: str                        # the driver's node (rank 0)
    work_endpoint_template: str      # the driver binds its work socket here ({generation} filled at start)
    rendezvous_template: str         # torch.distributed init_method ({generation} filled at start)
    env: dict[str, str]              # environment of every rank of the replica
    tensor_transport: str            # how this replica's outputs reach the next stage: "shm" | "frames"
    tensor_endpoint_template: str    # where its tensor server binds when the transport is "frames"
    ranks: list[RankPlacement]

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.replica}]"

    @property
    def single_node(self) -> bool:
        return all(r.node == self.node for r in self.ranks)

    def work_endpoint(self, generation: int, port: int = 0) -> str:
        return fill_port(self.work_endpoint_template.replace("{generation}", str(generation)), port)

    def rendezvous(self, generation: int, port: int = 0) -> str:
        return fill_port(self.rendezvous_template.replace("{generation}", str(generation)), port)

    def tensor_endpoint(self, generation: int, port: int = 0) -> str:
        return fill_port(self.tensor_endpoint_template.replace("{generation}", str(generation)), port)


def fill_port(endpoint: str, port: int) -> str:
    """``tcp://host:*`` with ``port`` (> 0) in place of ``*``; any other endpoint, or ``port`` 0, unchanged."""
    if port and endpoint.startswith("tcp://") and endpoint.endswith(":*"):
        return f"{endpoint[:-1]}{port}"
    return endpoint


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    run_dir: str                      # the instance's 0700 directory (ipc sockets, file stores)
    frontend_node: str
    result_endpoint: str              # the frontend binds it; every replica's output rank connects
    tensor_transport: str             # the setting it was computed with: "auto" | "shm" | "frames"
    replicas: list[ReplicaPlacement]
    launcher: str = "local"           # who starts the ranks: "local" | "ray"
    addresses: dict[str, str] = {}    # node -> the address its tcp endpoints use (absent: the node name)

    def address(self, node: str) -> str:
        return self.addresses.get(node, node)

    def replica(self, stage: str, index: int) -> ReplicaPlacement:
        for r in self.replicas:
            if r.stage == stage and r.replica == index:
                return r
        raise KeyError(f"no replica {stage}[{index}] in the placement")

    def of_stage(self, stage: str) -> list[ReplicaPlacement]:
        return [r for r in self.replicas if r.stage == stage]

    @property
    def nodes(self) -> list[str]:
        seen = [self.frontend_node]
        for rep in self.replicas:
            for rk in rep.ranks:
                if rk.node not in seen:
                    seen.append(rk.node)
        return seen

    @property
    def total_ranks(self) -> int:
        return sum(r.world_size for r in self.replicas)

    def format(self) -> str:
        """The placement and every rank's groups, as ``omni-runtime check`` prints them."""
        lines = [f"placement: {len(self.nodes)} node(s) {self.nodes}, run dir {self.run_dir}, "
                 f"tensor transport {self.tensor_transport}, launcher {self.launcher}",
                 f"  frontend on {self.frontend_node}: results {self.result_endpoint}"]
        for node in self.nodes:
            if node in self.addresses:
                lines.append(f"  node {node} at {self.addresses[node]}")
        for rep in self.replicas:
            env = " ".join(f"{k}={v}" for k, v in sorted(rep.env.items())) or "-"
            out = rep.tensor_transport
            if out == "frames":
                out += f" from {rep.tensor_endpoint_template}"
            lines.append(f"  {rep.label} on {rep.node}: work {rep.work_endpoint_template}, "
                         f"rendezvous {rep.rendezvous_template}, env {env}, outputs by {out}")
            for rk in rep.ranks:
                groups = " ".join(f"{k}={v}" for k, v in shown_groups(rk.groups).items())
                lines.append(f"  {rep.label} rank {rk.rank}/{rep.world_size} on {rk.device}: {groups} "
                             f"(node {rk.node}, local rank {rk.local_rank})")
        lines.append(f"total processes: {self.total_ranks} rank(s) + 1 frontend")
        return "\n".join(lines)


def device_for(cfg: RuntimeConfig, stage: str, index: int) -> str:
    """The device of global rank ``index`` of ``stage`` (replica-major)."""
    devices = cfg.stages.get(stage).devices
    if devices:  # the config has normalized indices to "cuda:N"
        return devices[index]
    return cfg.model.device if cfg.model.device == "cpu" else f"cuda:{index}"


def _stage_groups(cfg: RuntimeConfig, stage: str) -> list[dict[str, list[int]]]:
    """For each rank of one replica of ``stage``, its groups: ``layout.rank_groups`` of the stage's ParallelSpec
    (the arithmetic ``Mesh.build`` uses in the workers); a stage without a parallel table has only its world."""
    st = cfg.stages.get(stage)
    spec = getattr(st, "parallel", None)
    if spec is not None:
        return rank_groups(spec)
    return [{"world": list(range(st.world_size))} for _ in range(st.world_size)]


def _transport_setting(cfg: RuntimeConfig) -> str:
    value = os.environ.get(TRANSPORT_ENV) or cfg.placement.tensor_transport
    if value not in TENSOR_TRANSPORTS:
        raise ConfigError(f"{TRANSPORT_ENV} = {value!r}: allowed values are "
                          f"{', '.join(repr(t) for t in TENSOR_TRANSPORTS)}")
    return value


def this_node() -> str:
    return node_name()


def compute_placement(cfg: RuntimeConfig, run_dir: str,
                      nodes: Mapping[str, Sequence[str]] | None = None, *,
                      addresses: Mapping[str, str] | None = None, frontend: str | None = None,
                      devices: Mapping[str, Sequence[str]] | None = None) -> Placement:
    """The placement of every rank of every replica of ``cfg``.

    ``run_dir`` is the instance's run directory (``comm.instance.run_dir``). ``nodes`` maps a stage to the node
    of each of its global ranks (replica-major, like ``devices``); by default every rank runs on this node, next
    to the frontend (what :class:`runtime.launcher.LocalLauncher` starts). ``frontend`` names the frontend's node
    (default: this host's name), ``addresses`` the address of each node for its tcp endpoints (default: its
    name), ``devices`` each stage's rank devices when the launcher assigns them (Ray: ``cuda:0`` of each actor).

    The run directory exists on the frontend's node only: a ``file://`` rendezvous is used when every rank of
    the replica is there, else a tcp store on the driver's address.
    """
    frontend = frontend or this_node()
    addr = dict(addresses or {})
    setting = _transport_setting(cfg)
    stage_nodes: dict[str, list[str]] = {}
    for stage in STAGE_NAMES:
        st = cfg.stages.get(stage)
        n = st.world_size * st.replicas
        given = list((nodes or {}).get(stage, [])) or [frontend] * n
        if len(given) != n:
            raise ConfigError(f"placement of stage {stage}: {len(given)} node(s) given for {st.replicas} replica(s) "
                              f"x {st.world_size} rank(s) = {n} ranks")
        stage_nodes[stage] = given
    all_nodes = {frontend} | {n for ns in stage_nodes.values() for n in ns}
    one_node = len(all_nodes) == 1
    result_endpoint = f"ipc://{run_dir}/results" if one_node else f"tcp://{addr.get(frontend, frontend)}:*"
    replicas: list[ReplicaPlacement] = []
    for si, stage in enumerate(STAGE_NAMES):
        st = cfg.stages.get(stage)
        ws = st.world_size
        groups = _stage_groups(cfg, stage)
        consumers = set(stage_nodes[STAGE_NAMES[si + 1]]) if si + 1 < len(STAGE_NAMES) else {frontend}
        for rep in range(st.replicas):
            rnodes = stage_nodes[stage][rep * ws:(rep + 1) * ws]
            seen: dict[str, int] = {}
            ranks = []
            for r in range(ws):
                local = seen.get(rnodes[r], 0)
                seen[rnodes[r]] = local + 1
                dev = devices[stage][rep * ws + r] if devices else device_for(cfg, stage, rep * ws + r)
                ranks.append(RankPlacement(rank=r, local_rank=local, node=rnodes[r], device=dev, groups=groups[r]))
            driver = rnodes[0]
            host = addr.get(driver, driver)
            base = f"{stage}-{rep}-g{{generation}}"
            work = f"ipc://{run_dir}/{base}.in" if driver == frontend else f"tcp://{host}:*"
            if len(set(rnodes)) == 1:
                # the run directory (a file store) exists on the frontend's node; elsewhere a tcp store
                rendezvous = f"file://{run_dir}/{base}.store" if driver == frontend else f"tcp://{host}:*"
                env = {"GLOO_SOCKET_IFNAME": "lo"}
                if any(rk.device.startswith("cuda") for rk in ranks):
                    env["NCCL_SOCKET_IFNAME"] = "lo"
            else:
                rendezvous, env = f"tcp://{host}:*", {}
            if setting != "auto":
                transport = setting
            else:
                transport = "shm" if consumers == {driver} else "frames"
            # the output rank (the driver) serves frames: over ipc to consumers on its node, tcp to others
            tensors = (f"ipc://{run_dir}/{base}.tensors" if consumers == {driver} == {frontend}
                       else f"tcp://{host}:*")
            replicas.append(ReplicaPlacement(
                stage=stage, replica=rep, world_size=ws, node=driver, work_endpoint_template=work,
                rendezvous_template=rendezvous, env=env, tensor_transport=transport,
                tensor_endpoint_template=tensors, ranks=ranks))
    return Placement(run_dir=run_dir, frontend_node=frontend, result_endpoint=result_endpoint,
                     tensor_transport=setting, replicas=replicas, launcher=cfg.placement.launcher,
                     addresses={n: a for n, a in addr.items() if n in all_nodes and a != n})
