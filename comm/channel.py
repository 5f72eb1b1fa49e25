"""ZMQ channels between the orchestrator and stage drivers: serde frames, zero copy, bounded queues.

Patterns
--------
Both directions are one-way PUSH -> PULL pipes:

- **work into a stage driver**: the driver's :class:`Receiver` (PULL) binds its endpoint; the
  orchestrator holds one :class:`Sender` (PUSH) per replica, connected to that endpoint. One socket
  per replica because the orchestrator itself picks the least-loaded replica (a PUSH socket with
  several peers would round-robin behind its back). PUSH/PULL rather than DEALER/ROUTER because
  nothing needs a reply on the same socket or a peer identity: the request id lives in the message.
- **results back to the orchestrator**: the orchestrator's :class:`Receiver` (PULL) binds one
  endpoint; the output rank of every replica connects a :class:`Sender` (PUSH) to it (fan-in).

Receivers bind and senders connect by default (``bind=`` flips either): a connected PUSH queues
messages until its peer appears (up to the HWM), so start order does not matter, and when a crashed
driver is restarted on the same ipc path the orchestrator's PUSH reconnects by itself.

Queue bounds: ``sndhwm``/``rcvhwm`` are ZMQ high-water marks, counted in *messages*. When the
bounds are reached ``send`` waits (async) or blocks/times out (sync): backpressure, never drops.

Zero copy: ``send`` passes :func:`comm.serde.encode` frames with ``copy=False`` (pyzmq still copies
frames smaller than its ``copy_threshold``, 64 KiB by default, which is cheaper for small ones), so
a sent tensor must not be modified until ZMQ is done with it: ``sent()``/``wait_sent()`` (sync) or
``drain()`` (async) tell when. ``recv`` takes ``copy=False`` frames and decodes tensors as views of
them.

Socket factory: this module makes every ZMQ socket of the product (a repo rule test enforces it). The
channels below cover the stage pipes; :func:`make_socket` makes any other kind (the MessageQueue's XPUB/SUB,
the tensor server's ROUTER/DEALER) with the same policy, and :func:`new_context` a private context.

One HWM/linger policy for every socket: high-water marks of :data:`DEFAULT_HWM` messages per direction unless
the caller has a reason to bound otherwise (and says so where it does); ``linger=0`` at close unless a last
message must go out (``close(linger=s)``), so no close ever hangs on an absent peer.

Endpoints: :func:`ipc_endpoint` on one node (a unix socket in the instance's 0700 run directory,
:func:`comm.instance.run_dir`),
:func:`tcp_endpoint` across nodes (port 0 binds a free port; read it back from ``.endpoint``).
Sockets close with ``linger=0`` (``close(linger=s)`` drains first, for a last send at shutdown); a
channel that bound an ipc endpoint removes its socket file, and :func:`remove_ipc_dir` sweeps what
killed processes left. A process that exits right after sending large tensors must drain first:
ZMQ's I/O thread reads them after ``send`` returns, and interpreter teardown would free them.

:class:`Sender`/:class:`Receiver` are for asyncio (zmq.asyncio; uvloop works), and
:class:`SyncSender`/:class:`SyncReceiver` for plain worker loops such as the stage driver.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Sequence
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from omni_runtime.comm import serde
from omni_runtime.comm.instance import run_dir, run_dir_path

logger = logging.getLogger(__name__)

__all__ = [
    "ChannelClosed",
    "ChannelTimeout",
    "Receiver",
    "Sender",
    "SyncReceiver",
    "SyncSender",
    "ipc_dir",
    "ipc_endpoint",
    "make_socket",
    "new_context",
    "shared_context",
    "poll",
    "remove_ipc_dir",
    "unlink_ipc",
    "tcp_endpoint",
]

DEFAULT_HWM = 1000
_IPC_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAX_UNIX_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_C = TypeVar("_C", bound="_Channel")


class ChannelTimeout(TimeoutError):
    """A send or receive did not complete within its timeout."""


class ChannelClosed(RuntimeError):
    """The channel was used after ``close()``."""


# ----------------------------------------------------------------------------- endpoints


def ipc_dir() -> str:
    """Directory (mode 0700) that holds this runtime instance's ipc sockets: its run directory."""
    return str(run_dir())


def remove_ipc_dir(instance: str | None = None) -> list[str]:
    """Remove the socket files left in a runtime instance's run directory (by processes that were killed
    before they could close), then the directory if nothing else is in it (its ``owner`` record aside).
    Call once, when the whole instance shuts down. Returns the removed socket paths."""
    path = str(run_dir_path(instance))
    removed = []
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return removed
    for name in names:
        if name == "owner":
            continue
        if name.endswith(".sock"):
            try:
                os.unlink(os.path.join(path, name))
                removed.append(os.path.join(path, name))
            except FileNotFoundError:
                pass
    try:
        if set(os.listdir(path)) <= {"owner"}:
            os.unlink(os.path.join(path, "owner"))
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # something else lives there, or another process re-created a socket
        logger.warning("ipc directory %s not removed: %s", path, e)
    return removed


def ipc_endpoint(name: str) -> str:
    """``ipc://`` endpoint named ``name``, unique to this runtime instance (env ``OMNI_RUNTIME_INSTANCE``)."""
    if not _IPC_NAME_RE.match(name):
        raise ValueError(f"ipc endpoint name={name!r} is not allowed: use 1-64 characters from [A-Za-z0-9_.-]")
    path = os.path.join(ipc_dir(), f"{name}.sock")
    if len(path.encode()) > _MAX_UNIX_PATH:
        raise ValueError(
            f"ipc socket path {path!r} is {len(path.encode())} bytes; unix sockets allow at most "
            f"{_MAX_UNIX_PATH}: use a shorter name or TMPDIR"
        )
    return f"ipc://{path}"


def unlink_ipc(endpoint: str) -> None:
    """Remove the socket file of a bound ``ipc://`` endpoint (no-op for other endpoints), and the run
    directory too when this process owns it and nothing but its ``owner`` record is left."""
    path = _ipc_path(endpoint)
    if path is None:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    d = os.path.dirname(path)
    try:
        if set(os.listdir(d)) <= {"owner"}:
            with open(os.path.join(d, "owner")) as f:
                if int(f.read().split()[0]) == os.getpid():
                    os.unlink(os.path.join(d, "owner"))
                    os.rmdir(d)
    except (OSError, ValueError, IndexError):
        pass


def tcp_endpoint(host: str, port: int) -> str:
    """``tcp://`` endpoint; ``port=0`` binds a free port (``.endpoint`` then tells which)."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"tcp port={port!r} is not allowed: use an integer in 0..65535 (0 = any free port)")
    if not host or any(c in host for c in "/ "):
        raise ValueError(f"tcp host={host!r} is not allowed: use a host name or an IPv4/IPv6 address")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port if port else '*'}"


def _ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def _check_hwm(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} is not allowed: use an integer >= 0 (messages; 0 = unbounded)")
    return value


def _zero_copy_parts(frames: list[Any], threshold: int) -> tuple[list[Any], zmq.MessageTracker | None]:
    """Wrap frames that pyzmq will not copy (>= ``threshold`` bytes) so the last of them is tracked.

    Messages on one socket leave in order, so when the last zero-copy frame of the latest message
    is released every earlier zero-copy frame is released too: one tracker covers them all.
    """
    last = -1
    for i, f in enumerate(frames):
        if memoryview(f).nbytes >= threshold:
            last = i
    if last < 0:
        return frames, None
    parts = list(frames)
    parts[last] = zmq.Frame(frames[last], copy=False, track=True)
    return parts, parts[last].tracker


# ----------------------------------------------------------------------------- the socket factory


def shared_context(asyncio: bool = False) -> zmq.Context:
    """The process-wide ZMQ context channels use by default (``asyncio=True``: the ``zmq.asyncio`` one, whose
    sockets' ``recv``/``send``/``poll`` are awaitable)."""
    return zmq.asyncio.Context.instance() if asyncio else zmq.Context.instance()


def new_context(io_threads: int = 1) -> zmq.Context:
    """A private ZMQ context (the owner terminates it); channels use the process-wide one by default."""
    return zmq.Context(io_threads=io_threads)


def make_socket(
    kind: int,
    *,
    ctx: zmq.Context | None = None,
    sndhwm: int = DEFAULT_HWM,
    rcvhwm: int = DEFAULT_HWM,
    linger: int = 0,
    bind: str | None = None,
    connect: str | None = None,
    options: dict[int, int | bytes] | None = None,
) -> zmq.Socket:
    """Make a ZMQ socket of ``kind`` with the house policy, optionally bound or connected.

    ``sndhwm``/``rcvhwm`` are high-water marks in messages (0 = unbounded), ``linger`` is in milliseconds
    (0: close never waits), ``options`` further ``setsockopt`` values (set before bind/connect). XPUB
    sockets pass every subscription (``XPUB_VERBOSE``). ``bind`` with ``tcp://host:*`` picks a free port:
    read it back from ``LAST_ENDPOINT``. The socket is closed again if any step fails.
    """
    ctx = shared_context() if ctx is None else ctx
    sock = ctx.socket(kind)
    try:
        sock.setsockopt(zmq.SNDHWM, _check_hwm("sndhwm", sndhwm))
        sock.setsockopt(zmq.RCVHWM, _check_hwm("rcvhwm", rcvhwm))
        sock.setsockopt(zmq.LINGER, linger)
        if kind == zmq.XPUB:
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        for opt, value in (options or {}).items():
            sock.setsockopt(opt, value)
        for ep in (bind, connect):
            if ep is not None and ep.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
        if bind is not None:
            sock.bind(bind)
        if connect is not None:
            sock.connect(connect)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def poll(sockets: Sequence[zmq.Socket], timeout: float | None) -> list[zmq.Socket]:
    """The sockets of ``sockets`` that have a message to read, waiting at most ``timeout`` seconds."""
    poller = zmq.Poller()
    for s in sockets:
        poller.register(s, zmq.POLLIN)
    return [s for s, _ in poller.poll(None if timeout is None else max(0, int(timeout * 1000)))]


# ----------------------------------------------------------------------------- common socket setup


class _Channel:
    """One socket (type :attr:`_socket_type`) bound or connected to ``endpoint``.

    ``bind`` defaults to :attr:`_bind_default`; ``sndhwm``/``rcvhwm`` are high-water marks in messages
    (0 = unbounded); ``ctx`` defaults to the process-wide context of the subclass's kind (asyncio or not).
    """

    _socket_type: int = -1
    _bind_default: bool = False

    @staticmethod
    def _default_context() -> zmq.Context:
        return shared_context()

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool | None = None,
        sndhwm: int = DEFAULT_HWM,
        rcvhwm: int = DEFAULT_HWM,
        ctx: zmq.Context | None = None,
    ) -> None:
        if ctx is None:
            ctx = self._default_context()
        if not isinstance(endpoint, str) or not endpoint.startswith(("ipc://", "tcp://", "inproc://")):
            raise ValueError(f"endpoint={endpoint!r} is not allowed: use ipc://, tcp:// or inproc://")
        self.bound = self._bind_default if bind is None else bind
        self._ipc_file: str | None = None
        self.socket = make_socket(self._socket_type, ctx=ctx, sndhwm=sndhwm, rcvhwm=rcvhwm, linger=0,
                                  bind=endpoint if self.bound else None,
                                  connect=None if self.bound else endpoint)
        if self.bound:
            self._ipc_file = _ipc_path(endpoint)
            self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.endpoint = endpoint
        self._closed = False
        self._tracker: zmq.MessageTracker | None = None
        logger.debug("%s %s %s", type(self).__name__, "bound" if self.bound else "connected", self.endpoint)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed(f"{type(self).__name__} on {self.endpoint} is closed")

    def sent(self) -> bool:
        """True once ZMQ has released every zero-copy frame sent so far (written to the transport,
        or dropped): from then on the sent tensors may be modified or freed."""
        return self._tracker is None or self._tracker.done

    def wait_sent(self, timeout: float | None = None) -> bool:
        """Block until :meth:`sent` (at most ``timeout`` seconds); returns whether it is."""
        if self._tracker is None or self._tracker.done:
            return True
        try:
            self._tracker.wait(timeout=-1 if timeout is None else timeout)
        except zmq.NotDone:
            return False
        return True

    def close(self, linger: float = 0.0) -> None:
        """Close and remove a bound ipc file.

        By default at once: linger 0, so unsent messages are dropped and close never hangs on an
        absent peer. ``linger=s`` first waits up to ``s`` seconds for queued messages to go out (a
        graceful last send at shutdown). ZMQ's own close is asynchronous: a process that exits
        right after sending large tensors must ``close(linger=...)`` (or :meth:`wait_sent`), else
        the tensors can be freed while the I/O thread still reads them.
        """
        if self._closed:
            return
        self._closed = True
        if linger > 0:
            if not self.wait_sent(linger):
                logger.warning("%r: zero-copy frames still queued after linger=%ss; dropping them", self, linger)
        self.socket.close(linger=max(0, int(linger * 1000)))
        if self._ipc_file is not None:
            try:
                os.unlink(self._ipc_file)
            except FileNotFoundError:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("bound" if self.bound else "connected")
        return f"{type(self).__name__}({self.endpoint!r}, {state})"


# ----------------------------------------------------------------------------- asyncio


class _AsyncChannel(_Channel):
    """A channel on a ``zmq.asyncio`` context (the process-wide one by default); ``async with`` closes it."""

    @staticmethod
    def _default_context() -> zmq.Context:
        return shared_context(asyncio=True)

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Sender(_AsyncChannel):
    """Async PUSH end. ``await send(obj)`` waits while the peer's queue is full (backpressure).

    Connects by default (``bind=True`` to bind).
    """

    _socket_type = zmq.PUSH

    async def send(self, obj: Any, *, timeout: float | None = None) -> None:
        """Encode ``obj`` with serde and send it as one multipart message, zero copy."""
        await self.send_frames(serde.encode(obj), timeout=timeout)

    async def send_frames(self, frames: list[Any], *, timeout: float | None = None) -> None:
        """Send raw frames as one multipart message, zero copy for frames >= ``copy_threshold``."""
        self._check_open()
        parts, tracker = _zero_copy_parts(frames, self.socket.copy_threshold)
        fut = self.socket.send_multipart(parts, copy=False)
        del parts
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError as e:
            raise ChannelTimeout(f"send to {self.endpoint} did not complete in {timeout}s "
                                 f"(peer absent or its queue full)") from e
        if tracker is not None:
            self._tracker = tracker

    async def drain(self, timeout: float | None = None, poll_interval: float = 0.001) -> bool:
        """Wait (without blocking the loop) until every zero-copy frame sent so far is released."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while not self.sent():
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(poll_interval)
        return True


class Receiver(_AsyncChannel):
    """Async PULL end. ``await recv(type)`` returns the decoded object; tensors are frame views.

    Binds by default (``bind=False`` to connect).
    """

    _socket_type = zmq.PULL
    _bind_default = True

    async def recv_frames(self, *, timeout: float | None = None) -> list[zmq.Frame]:
        """The next message's raw frames (``zmq.Frame``, not copied)."""
        self._check_open()
        try:
            return await asyncio.wait_for(self.socket.recv_multipart(copy=False), timeout)
        except asyncio.TimeoutError as e:
            raise ChannelTimeout(f"nothing received on {self.endpoint} in {timeout}s") from e

    async def recv(self, type: Any = Any, *, timeout: float | None = None) -> Any:  # noqa: A002
        """Receive and decode the next message into ``type``; raises ``serde.SerdeError`` if malformed."""
        return serde.decode(await self.recv_frames(timeout=timeout), type)


# ----------------------------------------------------------------------------- blocking


def _ms(timeout: float | None) -> int:
    return -1 if timeout is None else max(0, int(timeout * 1000))


class _SyncChannel(_Channel):
    """A blocking channel on a plain ZMQ context (the process-wide one by default); ``with`` closes it."""

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncSender(_SyncChannel):
    """Blocking PUSH end for processes without an event loop. Connects by default."""

    _socket_type = zmq.PUSH

    def send(self, obj: Any, *, timeout: float | None = None) -> None:
        """Encode and send ``obj``; blocks while the queue is full, up to ``timeout`` seconds."""
        self.send_frames(serde.encode(obj), timeout=timeout)

    def send_frames(self, frames: list[Any], *, timeout: float | None = None) -> None:
        """Send raw frames as one multipart message, zero copy for frames >= ``copy_threshold``."""
        self._check_open()
        if timeout is not None and not self.socket.poll(_ms(timeout), zmq.POLLOUT):
            raise ChannelTimeout(f"send to {self.endpoint} did not complete in {timeout}s "
                                 f"(peer absent or its queue full)")
        parts, tracker = _zero_copy_parts(frames, self.socket.copy_threshold)
        self.socket.send_multipart(parts, copy=False)
        if tracker is not None:
            self._tracker = tracker


class SyncReceiver(_SyncChannel):
    """Blocking PULL end for processes without an event loop (the stage driver). Binds by default."""

    _socket_type = zmq.PULL
    _bind_default = True

    def recv_frames(self, *, timeout: float | None = None) -> list[zmq.Frame]:
        self._check_open()
        if timeout is not None and not self.socket.poll(_ms(timeout), zmq.POLLIN):
            raise ChannelTimeout(f"nothing received on {self.endpoint} in {timeout}s")
        return self.socket.recv_multipart(copy=False)

    def recv(self, type: Any = Any, *, timeout: float | None = None) -> Any:  # noqa: A002
        """Receive and decode the next message (``timeout=0`` polls); tensors are frame views."""
        return serde.decode(self.recv_frames(timeout=timeout), type)
