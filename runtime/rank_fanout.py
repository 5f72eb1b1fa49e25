"""Driver rank -> the other ranks of its replica: each batch the driver formed, in order.

One ZeroMQ PUSH/PULL ipc pipe per follower rank, messages encoded with msgspec (never pickle). TODO: switch to
``comm.shm_broadcast.MessageQueue`` (one shared-memory ring written once, read by every local rank) once it lands.
"""

from __future__ import annotations

import logging

import msgspec
import zmq

from runtime.messages import RankMessage

logger = logging.getLogger(__name__)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RankMessage)


class RankFanout:
    """``send(msg)`` on the driver, ``recv()`` on the others. ``ipc_base`` names this replica's pipes."""

    def __init__(self, rank: int, world_size: int, ipc_base: str) -> None:
        self.rank, self.world_size = rank, world_size
        self.ctx = zmq.Context.instance()
        self.socks: list[zmq.Socket] = []
        if world_size == 1:
            return
        if rank == 0:
            for r in range(1, world_size):
                s = self.ctx.socket(zmq.PUSH)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 1000)
                s.connect(f"{ipc_base}-r{r}")
                self.socks.append(s)
        else:
            s = self.ctx.socket(zmq.PULL)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVHWM, 1000)
            s.bind(f"{ipc_base}-r{rank}")
            self.socks.append(s)

    def send(self, msg: RankMessage) -> None:
        data = _encoder.encode(msg)
        for s in self.socks:
            s.send(data, copy=False)

    def recv(self) -> RankMessage:
        return _decoder.decode(self.socks[0].recv(copy=False).buffer)

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)
        self.socks = []
