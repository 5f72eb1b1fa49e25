"""Tensors between processes on different nodes: the producer keeps them, the consumer fetches them as ZMQ frames.

The producer's :class:`TensorServer` (one per process, a ROUTER socket served by one thread) holds published
tensors under random keys; :meth:`TensorServer.publish` returns a :class:`FrameRef` (endpoint + key + what the
tensors are), a small msgspec Struct that travels in the stage's result message. The consumer's
:func:`fetch` asks the producer for the key and receives the tensors as :mod:`comm.serde` frames: the bytes go
from the producer's tensor storage (zero copy on send) straight into the consumer's receive buffers (the decoded
tensors are views of them), without passing through the orchestrator. :func:`release` tells the producer to drop
them (``fetch(ref, release=True)`` does both in one round trip).

Wire protocol (DEALER -> ROUTER, every part bytes): request ``[op, request_id, key]`` with ``op`` one of
``GET``, ``TAKE`` (get and drop) and ``REL`` (drop; no reply); reply ``[request_id, b"OK", body, *frames]`` or
``[request_id, b"ERR", message]``. Replies to requests a client gave up on are discarded by request id.

Failures: a key the producer does not hold (released, or never published) raises :class:`FrameFetchError`
naming it; a producer that died raises :class:`FrameFetchError` at once when it ran on this node (its pid is
gone), else when it has not answered within ``timeout``. Nothing leaks: the producer's memory dies with it,
and the consumer's sockets are per thread, closed by :func:`close_clients`.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from itertools import count
from typing import Any

import msgspec
import torch
import zmq

from omni_runtime.comm import serde
from omni_runtime.comm.channel import make_socket, new_context, poll, shared_context, unlink_ipc
from omni_runtime.comm.node import node_id
from omni_runtime.comm.processes import pid_alive
from omni_runtime.comm.tensor_meta import TensorMeta

logger = logging.getLogger(__name__)

__all__ = ["FrameFetchError", "FrameRef", "TensorServer", "close_clients", "fetch", "release"]

_GET, _TAKE, _REL = b"GET", b"TAKE", b"REL"
_OK, _ERR = b"OK", b"ERR"
_POLL_S = 0.1


class FrameFetchError(RuntimeError):
    """The tensors of a :class:`FrameRef` cannot be fetched (released, unknown key, producer gone)."""


class FrameRef(msgspec.Struct, frozen=True, tag="frames"):
    """A remote reference to published tensors: where to fetch them and what they are."""

    endpoint: str                      # the producer's TensorServer
    key: str                           # random, 128 bits
    owner_pid: int
    node: str                          # comm.node.node_id() of the producer
    tensors: tuple[tuple[str, TensorMeta], ...]
    is_dict: bool = False

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for _, m in self.tensors)


def _as_items(obj: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    if isinstance(obj, torch.Tensor):
        return {"": obj}, False
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise TypeError(f"publish: entry {k!r} must map a str to a torch.Tensor, got {type(v).__name__}")
        return dict(obj), True
    raise TypeError(f"publish: got {type(obj).__name__}; expected a torch.Tensor or a dict[str, torch.Tensor]")


class TensorServer:
    """Holds published tensors and serves them to consumers; one thread, one ROUTER socket on ``endpoint``.

    ``endpoint`` is an ``ipc://`` path (one node; e.g. ``comm.channel.ipc_endpoint("tensors-...")``) or
    ``tcp://host:port`` (``port`` 0 picks one; ``self.endpoint`` tells which). The thread is a daemon; call
    :meth:`close` to stop it and drop everything still held.
    """

    def __init__(self, endpoint: str) -> None:
        self._ctx = new_context()
        if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
            endpoint = endpoint[:-2] + ":*"
        # Replies are bounded by what consumers ask for; the default HWM (messages) is the house policy.
        self._sock = make_socket(zmq.ROUTER, ctx=self._ctx, bind=endpoint,
                                 options={zmq.ROUTER_MANDATORY: 1})
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._bound = endpoint
        self._lock = threading.Lock()
        self._held: dict[str, tuple[dict[str, torch.Tensor], list[Any]]] = {}
        self._stop = threading.Event()
        self._pid = os.getpid()
        self._node = node_id()
        self._thread = threading.Thread(target=self._serve, name="tensor-server", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer side

    def publish(self, obj: torch.Tensor | Mapping[str, torch.Tensor]) -> FrameRef:
        """Keep ``obj`` (a tensor or a dict of tensors) until a consumer takes or releases it.

        The tensors are held as they are (made contiguous on the CPU once, if they are not): do not modify them
        until they have been fetched."""
        if self._stop.is_set():
            raise RuntimeError(f"TensorServer on {self.endpoint} is closed")
        items, is_dict = _as_items(obj)
        items = {k: v.detach().cpu().contiguous() for k, v in items.items()}
        metas = tuple((k, TensorMeta.of(v)) for k, v in items.items())
        frames = serde.encode(items)
        key = secrets.token_hex(16)
        with self._lock:
            self._held[key] = (items, frames)
        return FrameRef(endpoint=self.endpoint, key=key, owner_pid=self._pid, node=self._node,
                        tensors=metas, is_dict=is_dict)

    def drop(self, key: str) -> bool:
        with self._lock:
            return self._held.pop(key, None) is not None

    @property
    def held(self) -> int:
        """How many published objects are still held (neither taken nor released)."""
        with self._lock:
            return len(self._held)

    # ------------------------------------------------------------------ the server thread

    def _serve(self) -> None:
        sock = self._sock
        while not self._stop.is_set():
            if not sock.poll(int(_POLL_S * 1000), zmq.POLLIN):
                continue
            try:
                parts = sock.recv_multipart(copy=True)
            except zmq.ZMQError:
                break
            if len(parts) != 4:  # [identity, op, request id, key]; anything else is not ours
                logger.warning("tensor server: dropped a malformed request of %d parts", len(parts))
                continue
            ident, op, rid, raw_key = parts
            key = raw_key.decode("ascii", "replace")
            if op == _REL:
                self.drop(key)
                continue
            if op not in (_GET, _TAKE):
                reply = [ident, rid, _ERR, f"unknown op {op[:8]!r}; allowed: GET, TAKE, REL".encode()]
            else:
                with self._lock:
                    entry = self._held.pop(key, None) if op == _TAKE else self._held.get(key)
                if entry is None:
                    reply = [ident, rid, _ERR, f"key {key!r} is not held by the producer (pid {self._pid}): "
                             f"already released or taken, or never published".encode()]
                else:
                    # pyzmq keeps each zero-copy frame's buffer (a view of the tensor) alive until it is sent
                    reply = [ident, rid, _OK, *entry[1]]
            try:
                sock.send_multipart(reply, copy=False)
            except zmq.ZMQError as e:  # the consumer went away (ROUTER_MANDATORY): nothing to answer
                logger.debug("tensor server: reply not sent: %s", e)

    def close(self) -> None:
        """Stop serving, drop every held tensor, remove an ipc socket file. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(linger=0)
        self._ctx.term()
        unlink_ipc(self._bound)
        with self._lock:
            self._held.clear()


# ----------------------------------------------------------------------------- consumer side


class _Clients(threading.local):
    def __init__(self) -> None:
        self.ctx: zmq.Context | None = None
        self.socks: dict[str, zmq.Socket] = {}
        self.ids = count(1)


_clients = _Clients()
_all_clients: list[_Clients] = []
_all_lock = threading.Lock()


def _client(endpoint: str) -> zmq.Socket:
    c = _clients
    if c.ctx is None:
        c.ctx = shared_context()
        with _all_lock:
            _all_clients.append(c)
    sock = c.socks.get(endpoint)
    if sock is None:
        sock = make_socket(zmq.DEALER, ctx=c.ctx, connect=endpoint)
        c.socks[endpoint] = sock
    return sock


def close_clients() -> None:
    """Close this process's client sockets (every thread's); they are made again on the next fetch."""
    with _all_lock:
        clients = list(_all_clients)
        _all_clients.clear()
    for c in clients:
        for s in c.socks.values():
            s.close(linger=0)
        c.socks.clear()
        c.ctx = None


os.register_at_fork(after_in_child=lambda: (_all_clients.clear(), _clients.__init__()))


def _check_ref(ref: FrameRef) -> None:
    if not isinstance(ref, FrameRef):
        raise FrameFetchError(f"expected a FrameRef, got {type(ref).__name__}")
    if not isinstance(ref.endpoint, str) or not ref.endpoint.startswith(("ipc://", "tcp://")):
        raise FrameFetchError(f"FrameRef.endpoint={ref.endpoint!r} is not allowed: use ipc:// or tcp://")
    if not isinstance(ref.key, str) or len(ref.key) != 32:
        raise FrameFetchError(f"FrameRef.key={ref.key!r} is not a key of ours (32 hex characters)")


def fetch(ref: FrameRef, *, release: bool = False,
          timeout: float = 60.0) -> torch.Tensor | dict[str, torch.Tensor]:
    """The tensors of ``ref``, fetched from their producer (views of the received frames, read-only by contract).

    ``release=True`` also drops them at the producer (one round trip). Raises :class:`FrameFetchError` when the
    producer does not hold the key, when it died (at once on this node), or when it has not answered in
    ``timeout`` seconds."""
    _check_ref(ref)
    sock = _client(ref.endpoint)
    rid = str(next(_clients.ids)).encode()
    sock.send_multipart([_TAKE if release else _GET, rid, ref.key.encode()])
    same_node = ref.node == node_id()
    deadline = time.monotonic() + timeout
    while True:
        if poll([sock], _POLL_S):
            parts = sock.recv_multipart(copy=False)
            if len(parts) < 2 or parts[0].bytes != rid:
                continue  # a late answer to a request this thread gave up on
            status = parts[1].bytes
            if status == _ERR:
                text = parts[2].bytes.decode(errors="replace") if len(parts) > 2 else "(no message)"
                raise FrameFetchError(f"fetch of {ref.key} from {ref.endpoint}: {text}")
            if status != _OK:
                raise FrameFetchError(f"fetch of {ref.key} from {ref.endpoint}: malformed reply {status[:8]!r}")
            try:
                items = serde.decode(parts[2:], dict[str, torch.Tensor])
            except serde.SerdeError as e:
                raise FrameFetchError(f"fetch of {ref.key} from {ref.endpoint}: {e}") from None
            metas = {k: TensorMeta.of(v) for k, v in items.items()}
            if metas != dict(ref.tensors):
                raise FrameFetchError(f"fetch of {ref.key} from {ref.endpoint}: the tensors received do not match "
                                      f"the reference ({metas} != {dict(ref.tensors)})")
            return items if ref.is_dict else items[""]
        if same_node and not pid_alive(ref.owner_pid):
            raise FrameFetchError(f"fetch of {ref.key}: the producer (pid {ref.owner_pid}, {ref.endpoint}) is gone")
        if time.monotonic() >= deadline:
            raise FrameFetchError(f"fetch of {ref.key}: the producer (pid {ref.owner_pid} on "
                                  f"{ref.node.split('|')[0]}, {ref.endpoint}) did not answer within {timeout:g}s")


def release(ref: FrameRef) -> None:
    """Tell the producer to drop the tensors of ``ref`` (no reply; harmless when already dropped)."""
    _check_ref(ref)
    try:
        _client(ref.endpoint).send_multipart([_REL, b"0", ref.key.encode()], flags=zmq.NOBLOCK)
    except zmq.Again:
        logger.warning("release of %s: the queue to %s is full; the producer keeps it until it exits",
                       ref.key, ref.endpoint)
