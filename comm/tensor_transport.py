"""Tensors from one stage to the next, by either road: ``publish`` -> a reference in the message -> ``fetch`` -> ``release``.

- ``"shm"`` (producer and consumer on one node): :func:`comm.shm_tensor.put` (or a :class:`ShmPool`) writes the
  tensors into a shared-memory segment; the reference is a :class:`ShmHandle`; the consumer maps it (views, no
  copy) and its release unlinks (or returns to the pool) the segment.
- ``"frames"`` (different nodes, or forced for tests): this process's :class:`~comm.frame_transport.TensorServer`
  keeps the tensors; the reference is a :class:`FrameRef`; the consumer fetches them as zero-copy ZMQ frames
  straight from the producer, and its release drops them there.

The road is chosen by the placement (``ReplicaPlacement.tensor_transport``), not here. :data:`TensorRef` is the
tagged union to put in a message field (``inputs: TensorRef | None``); msgspec decodes either kind.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

import torch

from omni_runtime.comm import frame_transport, shm_tensor
from omni_runtime.comm.channel import ipc_endpoint
from omni_runtime.comm.frame_transport import FrameFetchError, FrameRef, TensorServer
from omni_runtime.comm.shm_tensor import ShmHandle, ShmHandleError, ShmPool

logger = logging.getLogger(__name__)

__all__ = [
    "TRANSPORTS", "FrameFetchError", "FrameRef", "ShmHandle", "ShmHandleError", "TensorRef", "close", "fetch",
    "publish", "release", "serve_frames",
]

TensorRef = ShmHandle | FrameRef
TRANSPORTS = ("shm", "frames")

_lock = threading.Lock()
_server: TensorServer | None = None


def serve_frames(endpoint: str | None = None) -> TensorServer:
    """This process's tensor server, started on ``endpoint`` the first time (default: an ipc socket in the
    instance's run directory; across nodes pass ``comm.channel.tcp_endpoint(<this node's address>, 0)``)."""
    global _server
    with _lock:
        if _server is None or _server._pid != os.getpid():
            _server = TensorServer(endpoint or ipc_endpoint(f"tensors-{os.getpid()}"))
            logger.info("tensor server on %s", _server.endpoint)
        return _server


def publish(obj: torch.Tensor | Mapping[str, torch.Tensor], transport: str = "shm", *,
            pool: ShmPool | None = None) -> TensorRef:
    """Hand ``obj`` (a tensor or a dict of tensors) to exactly one consumer; returns the reference to send it.

    ``transport`` is ``"shm"`` (``pool`` reuses segments; a pooled handle has one consumer) or ``"frames"``."""
    if transport == "shm":
        return pool.put(obj) if pool is not None else shm_tensor.put(obj)
    if transport == "frames":
        return serve_frames().publish(obj)
    raise ValueError(f"transport={transport!r} is not allowed; allowed: {', '.join(TRANSPORTS)}")


def fetch(ref: TensorRef, *, timeout: float = 60.0) -> torch.Tensor | dict[str, torch.Tensor]:
    """The tensors of ``ref``: views of the shm segment, or of the frames received from the producer.

    Raises :class:`ShmHandleError` / :class:`FrameFetchError` (both name the reference) when they are gone."""
    if isinstance(ref, ShmHandle):
        return shm_tensor.get(ref)
    if isinstance(ref, FrameRef):
        return frame_transport.fetch(ref, timeout=timeout)
    raise TypeError(f"fetch: expected a ShmHandle or a FrameRef, got {type(ref).__name__}")


def release(ref: TensorRef) -> None:
    """The consumer is done with ``ref``: unlink (or return to its pool) the segment, or drop it at the producer."""
    if isinstance(ref, ShmHandle):
        shm_tensor.release(ref)
    elif isinstance(ref, FrameRef):
        frame_transport.release(ref)
    else:
        raise TypeError(f"release: expected a ShmHandle or a FrameRef, got {type(ref).__name__}")


def close() -> None:
    """Stop this process's tensor server (dropping what it holds) and close its fetch sockets."""
    global _server
    with _lock:
        server, _server = _server, None
    if server is not None and server._pid == os.getpid():
        server.close()
    frame_transport.close_clients()
