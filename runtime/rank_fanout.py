"""Driver rank -> the other ranks of its replica: each batch the driver formed, then its per-step decisions.

A ``comm.shm_broadcast.MessageQueue`` built collectively over the replica's world *gloo* group (the mesh's
``world`` coordinator's ``cpu_group``): building it all-gathers node ids and broadcasts the queue's handle as CPU
tensors, which NCCL refuses, so it must never be built over a device group or an NCCL-only default group. The
driver enqueues each message once into a shared-memory ring and every other rank dequeues it. A message is encoded
once, by the queue (``comm.serde``, msgpack: no pickle); the reader converts the decoded value into the typed
:data:`~runtime.messages.RankMessage` union (a typed check, not a second decode of bytes). When the driver dies,
a blocked follower's ``dequeue`` raises ``MessageQueueCancelled`` and the follower exits.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec

from omni_runtime.runtime.messages import RankMessage

if TYPE_CHECKING:
    from omni_runtime.parallel.mesh import Mesh

logger = logging.getLogger(__name__)


class RankFanout:
    """``send(msg)`` on the driver, ``recv()`` on the others. Collective to build when ``world_size > 1``, over
    ``mesh``'s world group (required then)."""

    def __init__(self, rank: int, world_size: int, mesh: Mesh | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.mq = None
        if world_size > 1:
            from omni_runtime.comm.shm_broadcast import MessageQueue

            if mesh is None or mesh.size("world") != world_size:
                raise ValueError(f"RankFanout of {world_size} ranks needs the replica's mesh of {world_size} ranks, "
                                 f"got {mesh!r}")
            group = mesh.group("world").cpu_group  # gloo: the handle travels as CPU tensors
            self.mq = MessageQueue.create_from_process_group(group, writer_rank=0)
            if rank == 0:  # ranks on another node than the driver read over tcp (the placement says where)
                logger.info("batch broadcast to %d local reader(s) (shm ring) and %d remote reader(s) (tcp)",
                            self.mq.n_local_reader, self.mq.n_remote_reader)

    @property
    def has_followers(self) -> bool:
        return self.mq is not None

    def send(self, msg: RankMessage) -> None:
        if self.mq is not None:
            self.mq.enqueue(msg)

    def recv(self) -> RankMessage:
        assert self.mq is not None
        return msgspec.convert(self.mq.dequeue(), RankMessage)

    def close(self) -> None:
        if self.mq is not None:
            self.mq.close()
            self.mq = None
