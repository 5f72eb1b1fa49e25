"""A process group for metadata that does not touch torch.distributed's global state.

``torch.distributed.init_process_group`` is global: once processes A and B formed
a group, A, B, C and D cannot form another default group. Each stage replica and
the runtime's control plane need groups of their own, so this module offers:

- :class:`StatelessProcessGroup`: point-to-point, broadcast, all-gather and a
  barrier for small Python objects, over a ``torch.distributed.TCPStore``
  (rank 0 hosts the store server).
- :func:`stateless_init_torch_distributed_process_group`: a real
  ``ProcessGroup`` (gloo, or nccl where available) built directly on its own
  store, usable for collectives such as ``allreduce`` through its methods or
  ``torch.distributed.all_reduce(t, group=pg)``, without ever creating the
  default group. Calls that translate a *global* rank (``dist.broadcast(src=)``)
  do not apply; use the group's own methods with group ranks.

Objects are encoded with msgspec (:func:`comm.serde.encode_to_bytes`), never
pickle: they must be msgspec-encodable, i.e. built from None, bool, int, float,
str, bytes, lists/tuples, dicts, msgspec Structs, dataclasses, and tensors or
numpy arrays. Decoding yields the untyped form (Structs/dataclasses arrive as
dicts; tuples as lists). Only use this for metadata: every object travels
through the store server.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from omni_runtime.comm.serde import decode_from_bytes, encode_to_bytes

logger = logging.getLogger(__name__)

_POLL_MIN_S = 0.001
_POLL_MAX_S = 0.05


@dataclass
class StatelessProcessGroup:
    """Rank, world size and a shared store; exchanges msgspec-encodable objects between ranks.

    Create it with :meth:`create`. Every key written by ``send_obj`` and
    ``broadcast_obj`` is remembered with its time and deleted by
    :meth:`expire_data` once older than ``data_expiration_seconds`` (called on
    every send). Point-to-point messages are also deleted by their receiver.
    """

    rank: int
    world_size: int
    store: dist.Store
    data_expiration_seconds: int = 3600
    send_dst_counter: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    recv_src_counter: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    broadcast_send_counter: int = 0
    broadcast_recv_src_counter: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    barrier_counter: int = 0
    entries: deque[tuple[str, float]] = field(default_factory=deque)

    @staticmethod
    def create(
        host: str,
        port: int,
        rank: int,
        world_size: int,
        data_expiration_seconds: int = 3600,
        store_timeout: int = 300,
    ) -> StatelessProcessGroup:
        """Join (rank 0: host) the store at ``host:port``; returns once every rank has connected."""
        _check_rank(rank, world_size)
        store = dist.TCPStore(
            host_name=host,
            port=port,
            world_size=world_size,
            is_master=(rank == 0),
            timeout=timedelta(seconds=store_timeout),
        )
        return StatelessProcessGroup(
            rank=rank, world_size=world_size, store=store, data_expiration_seconds=data_expiration_seconds
        )

    # ------------------------------------------------------------------ data

    def _put(self, key: str, obj: Any) -> None:
        self.expire_data()
        self.store.set(key, encode_to_bytes(obj))
        self.entries.append((key, time.monotonic()))

    def expire_data(self) -> int:
        """Delete the keys this rank wrote more than ``data_expiration_seconds`` ago; returns how many."""
        deadline = time.monotonic() - self.data_expiration_seconds
        n = 0
        while self.entries and self.entries[0][1] <= deadline:
            key, _ = self.entries.popleft()
            self.store.delete_key(key)
            n += 1
        return n

    def send_obj(self, obj: Any, dst: int) -> None:
        """Send a msgspec-encodable object to rank ``dst`` (does not wait for it to be received)."""
        self._check_peer(dst, "dst")
        key = f"p2p/{self.rank}->{dst}/{self.send_dst_counter[dst]}"
        self._put(key, obj)
        self.send_dst_counter[dst] += 1

    def recv_obj(self, src: int) -> Any:
        """Receive the next object rank ``src`` sent to this rank (blocks up to the store timeout)."""
        self._check_peer(src, "src")
        key = f"p2p/{src}->{self.rank}/{self.recv_src_counter[src]}"
        obj = decode_from_bytes(self.store.get(key))
        self.store.delete_key(key)
        self.recv_src_counter[src] += 1
        return obj

    def broadcast_obj(self, obj: Any | None, src: int) -> Any:
        """Broadcast ``obj`` from rank ``src``; every rank returns it. Keys live until they expire."""
        _check_rank(src, self.world_size, "src")
        if self.rank == src:
            self._put(f"bcast/{src}/{self.broadcast_send_counter}", obj)
            self.broadcast_send_counter += 1
            return obj
        key = f"bcast/{src}/{self.broadcast_recv_src_counter[src]}"
        out = decode_from_bytes(self.store.get(key))
        self.broadcast_recv_src_counter[src] += 1
        return out

    def all_gather_obj(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        return [self.broadcast_obj(obj if r == self.rank else None, src=r) for r in range(self.world_size)]

    # ------------------------------------------------------------------ barrier

    def _wait_keys(self, keys: dict[int, str], deadline: float, phase: str, barrier_id: int) -> None:
        pending = dict(keys)
        sleep = _POLL_MIN_S
        while True:
            pending = {r: k for r, k in pending.items() if not self.store.check([k])}
            if not pending:
                return
            now = time.monotonic()
            if now >= deadline:
                raise RuntimeError(
                    f"StatelessProcessGroup barrier #{barrier_id} timed out on rank {self.rank} "
                    f"(world size {self.world_size}) in phase '{phase}': rank(s) {sorted(pending)} "
                    f"did not {phase}"
                )
            time.sleep(min(sleep, deadline - now))
            sleep = min(sleep * 2, _POLL_MAX_S)

    def barrier(self, timeout: float = 30.0) -> None:
        """Block until every rank reached this barrier.

        Three phases, each bounded by ``timeout`` seconds: every rank signals its
        arrival and waits for all arrivals; every rank confirms it saw them all and
        waits for all confirmations (so no rank can race ahead into the next
        barrier while a peer still polls this one); every rank signals departure
        and rank 0 waits for all departures, then deletes the barrier's keys.
        Raises ``RuntimeError`` naming the ranks that did not show up in time.
        """
        bid = self.barrier_counter
        self.barrier_counter += 1
        phases = ("arrive", "confirm", "depart")
        keys = {p: {r: f"barrier/{bid}/{p}/{r}" for r in range(self.world_size)} for p in phases}
        for phase in phases:
            self.store.set(keys[phase][self.rank], b"1")
            if phase != "depart" or self.rank == 0:
                self._wait_keys(keys[phase], time.monotonic() + timeout, phase, bid)
        if self.rank == 0:
            for phase in phases:
                for key in keys[phase].values():
                    self.store.delete_key(key)

    # ------------------------------------------------------------------ helpers

    def _check_peer(self, peer: int, name: str) -> None:
        _check_rank(peer, self.world_size, name)
        if peer == self.rank:
            raise ValueError(f"{name}={peer} is this rank itself; point-to-point needs another rank")


def _check_rank(rank: int, world_size: int, name: str = "rank") -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an int >= 1")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"{name}={rank!r} must be an int in [0, {world_size - 1}] for world_size={world_size}")


# ---------------------------------------------------------------------- torch ProcessGroup


def stateless_init_torch_distributed_process_group(
    host: str,
    port: int,
    rank: int,
    world_size: int,
    backend: str,
    timeout: timedelta = timedelta(seconds=300),
) -> dist.ProcessGroup:
    """A ``ProcessGroup`` over its own TCPStore at ``host:port``, without the global default group.

    ``backend`` is ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA, where torch has it).
    ``torch.distributed.is_initialized()`` stays as it was. Collectives use group
    ranks: call the group's methods (``pg.allreduce([t]).wait()``) or
    ``dist.all_reduce(t, group=pg)``. Free it with
    :func:`stateless_destroy_torch_distributed_process_group`.
    """
    _check_rank(rank, world_size)
    backend = str(backend).lower()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r} is not supported; allowed: 'gloo', 'nccl'")
    if backend == "nccl" and not (dist.is_nccl_available() and torch.cuda.is_available()):
        raise ValueError("backend='nccl' needs a CUDA build of torch with NCCL and a GPU; use 'gloo'")
    store = dist.TCPStore(
        host_name=host, port=port, world_size=world_size, is_master=(rank == 0), timeout=timeout
    )
    prefix_store = dist.PrefixStore(f"stateless/{backend}", store)
    pg = dist.ProcessGroup(prefix_store, rank, world_size)
    if backend == "gloo":
        backend_type = dist.ProcessGroup.BackendType.GLOO
        device = torch.device("cpu")
        impl = dist.ProcessGroupGloo(prefix_store, rank, world_size, timeout=timeout)
    else:
        backend_type = dist.ProcessGroup.BackendType.NCCL
        device = torch.device("cuda", torch.cuda.current_device())
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        impl = dist.ProcessGroupNCCL(prefix_store, rank, world_size, opts)
    impl._set_sequence_number_for_group()
    pg._set_default_backend(backend_type)
    pg._register_backend(device, backend_type, impl)
    logger.debug("stateless %s group: rank %d of %d at %s:%d", backend, rank, world_size, host, port)
    return pg


def stateless_destroy_torch_distributed_process_group(pg: dist.ProcessGroup) -> None:
    """Shut down a group made by :func:`stateless_init_torch_distributed_process_group`."""
    pg.shutdown()
