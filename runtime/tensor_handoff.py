"""The one seam through which tensors travel from one stage to the next: ``publish`` / ``fetch`` / ``release``.

The producer's shell calls :func:`publish` on a stage output and sends the returned :data:`TensorRef` (a small
msgspec Struct) inside a message; the consumer's shell calls :func:`fetch` to get the tensors back and
:func:`release` once it is done with them (the orchestrator releases a ref whose item was abandoned). Nothing else
in the runtime touches the transport.

Today every ref is a ``comm.shm_tensor`` handle (one node: the tensors lie in a ``/dev/shm`` segment the producer
owns; ``fetch`` maps it without a copy). A producer whose outputs have a single reader (the next stage's driver,
which releases after copying them) may publish through a :class:`Publisher` with ``pooled=True``, which reuses
released segments instead of making a fresh one per output.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Union

import torch

from omni_runtime.comm import shm_tensor

logger = logging.getLogger(__name__)

#: What a message carries in place of tensors. A union so that other transports can join it.
TensorRef = Union[shm_tensor.ShmHandle]  # noqa: UP007 (a one-member union today; msgspec needs a real type)

Tensors = Union[torch.Tensor, Mapping[str, torch.Tensor]]  # noqa: UP007

POOL_MAX_BYTES = 256 << 20


def publish(tensors: Tensors) -> TensorRef:
    """Make ``tensors`` (a tensor, or a dict of them) available to another process; returns the ref to send."""
    return shm_tensor.put(tensors)


def fetch(ref: TensorRef) -> Tensors:
    """The tensors a ref names (views: valid until :func:`release`; copy what must outlive it)."""
    return shm_tensor.get(ref)


def release(ref: TensorRef) -> None:
    """The consumer is done with ``ref`` (a second release is harmless)."""
    shm_tensor.release(ref)


def shutdown() -> None:
    """Free everything this process published and nobody released (called once at process exit)."""
    shm_tensor.shutdown()


class Publisher:
    """How one producing stage publishes: a fresh segment per output, or (``pooled``) reused segments."""

    def __init__(self, pooled: bool = False, max_bytes: int = POOL_MAX_BYTES) -> None:
        self._pool = shm_tensor.ShmPool(max_bytes=max_bytes) if pooled else None

    @property
    def pooled(self) -> bool:
        return self._pool is not None

    def publish(self, tensors: Tensors) -> TensorRef:
        return self._pool.put(tensors) if self._pool is not None else publish(tensors)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
