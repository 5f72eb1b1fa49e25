"""The one seam through which tensors travel from one stage to the next: ``publish`` / ``fetch`` / ``release``.

The producer's shell publishes a stage output through its :class:`Publisher` and sends the returned
:data:`TensorRef` (a small msgspec Struct) inside a message; the consumer's shell calls :func:`fetch` to get the
tensors back and :func:`release` once it is done with them (the orchestrator releases a ref whose item was
abandoned). Nothing else in the runtime touches the transport.

The road is the placement's (``WorkerSpec.tensor_transport``, :mod:`comm.tensor_transport`): ``"shm"`` when the
consumer is on the producer's node (a ``/dev/shm`` segment the producer owns; ``fetch`` maps it without a copy;
a producer whose outputs have one reader, the next stage's driver, may reuse segments with ``pooled=True``), or
``"frames"`` across nodes (the producer's tensor server keeps them and the consumer fetches them as zero-copy ZMQ
frames straight from it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Union

import torch

from omni_runtime.comm import shm_tensor, tensor_transport

logger = logging.getLogger(__name__)

#: What a message carries in place of tensors: a ``ShmHandle`` or a ``FrameRef`` (a tagged union msgspec decodes).
TensorRef = tensor_transport.TensorRef

Tensors = Union[torch.Tensor, Mapping[str, torch.Tensor]]  # noqa: UP007

POOL_MAX_BYTES = 256 << 20


def fetch(ref: TensorRef) -> Tensors:
    """The tensors a ref names (views: valid until :func:`release`; copy what must outlive it)."""
    return tensor_transport.fetch(ref)


def release(ref: TensorRef) -> None:
    """The consumer is done with ``ref`` (a second release is harmless)."""
    tensor_transport.release(ref)


def shutdown() -> None:
    """Free everything this process published and nobody released (called once at process exit)."""
    tensor_transport.close()
    shm_tensor.shutdown()


class Publisher:
    """How one producing stage publishes: by ``transport`` (``"shm"`` or ``"frames"``); with shm, a fresh segment
    per output or (``pooled``) reused segments. With frames the tensor server starts on ``endpoint`` (the
    placement's; default: an ipc socket in the instance's run directory)."""

    def __init__(self, pooled: bool = False, max_bytes: int = POOL_MAX_BYTES, *, transport: str = "shm",
                 endpoint: str = "") -> None:
        if transport not in tensor_transport.TRANSPORTS:
            raise ValueError(f"transport={transport!r}; allowed: {', '.join(tensor_transport.TRANSPORTS)}")
        self.transport = transport
        self._pool = shm_tensor.ShmPool(max_bytes=max_bytes) if pooled and transport == "shm" else None
        if transport == "frames":
            tensor_transport.serve_frames(endpoint or None)

    @property
    def pooled(self) -> bool:
        return self._pool is not None

    def publish(self, tensors: Tensors) -> TensorRef:
        return tensor_transport.publish(tensors, self.transport, pool=self._pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
