"""One writer, N readers: broadcast objects through a shared-memory ring (local readers) and ZMQ (remote).

This is the broadcaster behind ``runtime.rank_fanout.RankFanout``: a stage's driver rank enqueues each batch once
and every other rank dequeues it, in order.

Pieces
------
- :class:`ShmRingBuffer`: ``max_chunks`` chunks of ``max_chunk_bytes`` in one ``/dev/shm`` segment,
  plus one metadata row per chunk ``[written, read_0, ..., read_{n-1}]`` and int32 "asleep" words (one
  per reader, one for the writer) that double as futex words.
- :class:`MessageQueue`: the protocol on top. Local readers (same node) read chunks from the ring;
  remote readers (other nodes) receive the same messages over a ZMQ XPUB/SUB socket on
  ``tcp://connect_ip``. A payload that does not fit a chunk is sent over a local ZMQ socket and the
  chunk only carries an "overflow" marker, so large objects never fail.
- :class:`Handle`: a msgspec Struct with everything a reader needs to attach
  (:meth:`MessageQueue.export_handle` / :meth:`MessageQueue.create_from_handle`).

Setting up: either ship the handle yourself (writer: ``MessageQueue(...)`` + ``export_handle()``;
readers: ``create_from_handle(handle, rank)``; then everyone calls ``wait_until_ready()``), or call the
collective :meth:`MessageQueue.create_from_process_group` on a gloo group, which does all of it.

Payloads are encoded by :mod:`comm.serde` (no pickle): tensors and arrays travel as raw frames.
``dequeue`` returns objects that own their memory (copied out of the ring), so the writer can reuse the
chunk at once.

Chunk protocol and memory ordering
----------------------------------
Writer, for chunk ``i`` (round robin)::

    wait until written[i] == 0 or all read[i][*] == 1      # free: never used, or every reader is done
    written[i] = 0
    write the payload (or the overflow marker) into chunk i
    read[i][*] = 0
    written[i] = 1                                         # publish
    fence; wake every reader whose asleep word is set

Reader ``r``, for its next chunk ``i``::

    wait until written[i] == 1 and read[i][r] == 0
    copy the payload out of chunk i
    read[i][r] = 1                                         # release the chunk for this reader

Each flag is a single byte written by one store (``memoryview`` item assignment, a plain C store). The
data is always stored before the flag that publishes it, and read after the flag that announced it.
On x86 (TSO) stores become visible in program order and loads are not reordered with loads, so this is
sufficient; every step is a separate C call from the interpreter, so the C compiler cannot reorder them
either. On weakly ordered CPUs (ARM, POWER) a hardware barrier would be needed between data and flag;
we do not run there.

Waiting without burning CPU
---------------------------
A reader spins for at most :attr:`MessageQueue.spin_seconds` (1 ms) calling ``os.sched_yield()``
between checks, so spinning ranks on a 2-core machine give the CPU back to the writer. Then it sets its
asleep word to 1, issues a fence, re-checks the ring and sleeps. The writer publishes the chunk, issues
a fence and wakes only the readers whose word is set. With a full fence on both sides (a locked
instruction on x86, see :func:`_fence`) either the reader's re-check sees the new chunk or the writer
sees the asleep word: no wake-up is lost. Two wake-up mechanisms (the writer picks, readers follow the
handle; :attr:`MessageQueue.use_futex`):

- **futex** (Linux, default): the reader calls ``futex(FUTEX_WAIT, word, 1)``; the writer sets the word
  to 0 and calls ``FUTEX_WAKE``. The kernel sleeps only while the word is still 1, so a wake that comes
  between the re-check and the sleep is never missed. The reader is woken directly by the kernel (about
  half the latency of a ZMQ ping, which crosses two I/O threads). The writer sleeps on its own word when
  the ring is full, and a reader that releases a chunk wakes it.
- **zmq**: the writer sends an empty message on an ``ipc://`` XPUB socket; the reader polls it.
  Readers drain pending pings *before* re-checking the ring, so a ping consumed always belongs to a
  chunk the re-check can see. A writer on a full ring sleeps with exponential backoff (50 µs up to 1 ms;
  20 ms after the first second).

An idle reader sleeps (it wakes once a second to check the writer is alive; nothing more).
``enqueue(timeout=...)`` raises :class:`MessageQueueTimeout` naming the reader ranks that have not
consumed the chunk (a dead reader never does); with ``timeout=None`` it waits forever but logs a warning
every 60 s. The same holds for ``dequeue``.

Remote readers get every message over XPUB/SUB with a bounded queue (:attr:`MessageQueue.remote_hwm`
messages per side) and ``XPUB_NODROP``: a remote reader that falls behind makes ``enqueue`` wait (with
the same backoff and timeout) instead of silently losing messages.

Shutdown and failures
---------------------
:meth:`MessageQueue.shutdown` may be called from any thread: a blocked ``dequeue`` (or ``enqueue``)
raises :class:`MessageQueueCancelled` at once (an inproc PAIR socket in the reader's poller plus a
``threading.Event`` for the writer's sleeps). A blocked local reader also checks once a second that the
writer process is alive and raises :class:`MessageQueueCancelled` when it is gone. The writer's
``close()`` sets a "closed" word in the segment (after its last publish) and sends an empty frame to
remote readers: readers still get everything enqueued before, then ``dequeue`` raises
:class:`MessageQueueCancelled` instead of blocking forever. ``enqueue``,
``dequeue`` and ``close`` belong to the thread that owns the queue: call ``shutdown()`` from another
thread first, then ``close()`` from the owner.

Shared-memory lifetime
----------------------
The writer creates the segment (mode 0600) under the runtime-instance prefix of
:func:`comm.shm_tensor.instance_prefix`, named like the handoff segments
(``omni_<instance>_<pid>_<n>_<nonce>``) so the launcher's :func:`comm.shm_tensor.sweep` also removes
it when the writer is SIGKILLed. Readers attach before they subscribe, so once
:meth:`MessageQueue.wait_until_ready` has seen every subscription the writer unlinks the name at
once: from then on no crash of any process can leave a ``/dev/shm`` entry behind, and the memory is
freed when the last process unmaps it. ``close()`` (and a finalizer) unlink it if that never happened.
We do not use :mod:`multiprocessing.shared_memory`: on Python < 3.13 its resource tracker registers the
segment in every *reader* and unlinks it (with a "leaked" warning) when that reader exits.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import multiprocessing.util
import os
import platform
import re
import secrets
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from itertools import count
from typing import Any

import msgspec
import zmq

from omni_runtime.comm import serde
from omni_runtime.comm.channel import (
    DEFAULT_HWM,
    ipc_endpoint,
    make_socket,
    new_context,
    tcp_endpoint,
    unlink_ipc,
)
from omni_runtime.comm.node import node_id
from omni_runtime.comm.shm_tensor import instance_prefix, pid_alive

logger = logging.getLogger(__name__)

__all__ = [
    "Handle",
    "MessageQueue",
    "MessageQueueCancelled",
    "MessageQueueTimeout",
    "ShmRingBuffer",
]

SHM_DIR = "/dev/shm"
DEFAULT_MAX_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_CHUNKS = 16

_KIND_INLINE = 1
_KIND_OVERFLOW = 2
_ALIGN = 64
_CHUNK_HEADER = struct.Struct("<BxxxI")  # kind, pad, number of frames; then u64 length per frame
_READY = b"READY"
_CLOSED = b""  # a serde body is never empty, so an empty frame on the remote socket means "writer closed"
_NAME_RE = re.compile(r"^omni_[A-Za-z0-9.-]{1,64}_\d{1,10}_\d{1,20}_[0-9a-f]{8}$")
_counter = count(1)


class MessageQueueTimeout(TimeoutError):
    """``enqueue``/``dequeue``/``wait_until_ready`` did not complete within its timeout."""


class MessageQueueCancelled(RuntimeError):
    """The queue was shut down (``MessageQueue.shutdown``) while an operation was waiting."""


class Handle(msgspec.Struct, frozen=True):
    """Everything a reader needs to attach to a :class:`MessageQueue` (msgspec-serializable)."""

    n_reader: int
    local_reader_ranks: tuple[int, ...]
    buffer_name: str | None
    max_chunk_bytes: int
    max_chunks: int
    local_wake_addr: str | None
    local_overflow_addr: str | None
    remote_addr: str | None
    writer_pid: int = 0


_FENCE_LOCK = threading.Lock()


def _fence() -> None:
    """Full memory barrier between a store and a later load (Dekker-style handshake).

    Acquiring and releasing an uncontended lock executes locked read-modify-write instructions
    (``sem_trywait``/``sem_post`` in CPython's lock), which are full barriers on x86.
    """
    with _FENCE_LOCK:
        pass


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# Linux futex(2) on a word of the shared mapping: a blocked waiter is woken directly by the kernel, with
# no helper threads in between. FUTEX_WAIT sleeps only while the word still holds the expected value
# (checked atomically by the kernel), which is what makes the asleep/wake handshake race-free.
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine().lower())
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") and _SYS_FUTEX else None
HAS_FUTEX = _libc is not None and hasattr(_libc, "syscall")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _futex_wait(addr: int, expected: int, timeout: float) -> bool:
    """Sleep while the int32 at ``addr`` equals ``expected`` (at most ``timeout`` s). True if it timed out."""
    timeout = max(timeout, 0.0)
    ts = _Timespec(int(timeout), int((timeout % 1.0) * 1e9))
    r = _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_int(_FUTEX_WAIT),
                      ctypes.c_int(expected), ctypes.byref(ts), None, ctypes.c_int(0))
    return r != 0 and ctypes.get_errno() == errno.ETIMEDOUT  # else woken, EAGAIN (value changed) or EINTR


def _futex_wake(addr: int) -> None:
    """Wake the waiters on the int32 at ``addr`` (a bad address only makes the syscall fail)."""
    _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_int(_FUTEX_WAKE),
                  ctypes.c_int(1 << 30), None, None, ctypes.c_int(0))


# ----------------------------------------------------------------------------- ring buffer


class ShmRingBuffer:
    """``max_chunks`` chunks of ``max_chunk_bytes`` plus per-chunk flags, in one ``/dev/shm`` segment.

    Layout (byte offsets; D = max_chunks * max_chunk_bytes, a multiple of 64)::

        [0, D)                data: chunk i at i * max_chunk_bytes
        [D, D + 4n)           int32 "asleep" word per reader (futex words)          -> words[0 .. n-1]
        [D + 4n, D + 4n + 4)  int32 "asleep" word of the writer (ring full)          -> words[n]
        [D + 4n + 4, +4)      int32 "closed": set by the writer's close() after its last publish -> words[n+1]
        [D + 4n + 8, +M)      metadata: row i = written, read_0 .. read_{n-1}  (M = max_chunks * (1 + n))

    ``name=None`` creates a new segment owned (and unlinked) by this object; a name attaches to an
    existing one, which is never unlinked by the attaching side.
    """

    def __init__(self, n_reader: int, max_chunk_bytes: int, max_chunks: int, name: str | None = None) -> None:
        if n_reader < 1:
            raise ValueError(f"n_reader={n_reader} is not allowed: a ring needs at least 1 reader")
        if max_chunk_bytes < _ALIGN or max_chunk_bytes % _ALIGN:
            raise ValueError(
                f"max_chunk_bytes={max_chunk_bytes} is not allowed: use a multiple of {_ALIGN}, at least {_ALIGN}"
            )
        if max_chunks < 1:
            raise ValueError(f"max_chunks={max_chunks} is not allowed: use at least 1")
        self.n_reader = n_reader
        self.max_chunk_bytes = max_chunk_bytes
        self.max_chunks = max_chunks
        self.data_bytes = max_chunk_bytes * max_chunks
        self.row_bytes = 1 + n_reader
        self.meta_bytes = self.row_bytes * max_chunks
        self.words_offset = self.data_bytes
        self.meta_offset = self.words_offset + 4 * (n_reader + 2)
        self.total_bytes = self.meta_offset + self.meta_bytes
        self.writer_word = n_reader
        self.closed_word = n_reader + 1
        self.is_owner = name is None
        self._unlinked = not self.is_owner
        if name is None:
            name, fd = self._create()
        else:
            if not _NAME_RE.match(name):
                raise ValueError(f"buffer_name={name!r} is not a ring-buffer segment name of ours")
            try:
                fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"shm segment {name!r} does not exist: the writer unlinks it in wait_until_ready() once "
                    f"every local reader attached (or it exited); create every reader before that"
                ) from None
        self.name = name
        try:
            if not self.is_owner:
                size = os.fstat(fd).st_size
                if size != self.total_bytes:
                    raise ValueError(
                        f"shm segment {name!r} has {size} bytes; the handle describes {self.total_bytes}"
                    )
            self._mmap = mmap.mmap(fd, self.total_bytes, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            if self.is_owner:
                self.unlink()
            raise
        finally:
            os.close(fd)
        anchor = ctypes.c_char.from_buffer(self._mmap)
        self._address = ctypes.addressof(anchor)  # only for futex syscalls, which fail safely once unmapped
        del anchor  # no exported buffer may outlive close()
        self._buf = memoryview(self._mmap)
        self.data = self._buf[: self.data_bytes]
        self.words = self._buf[self.words_offset : self.meta_offset].cast("i")
        self.reader_words = self._buf[self.words_offset : self.words_offset + 4 * n_reader]  # bytes view
        self.meta = self._buf[self.meta_offset :]
        self._finalizer = None
        if self.is_owner:
            # Runs on garbage collection and at interpreter / multiprocessing-child exit.
            self._finalizer = multiprocessing.util.Finalize(
                self, _unlink_quietly, args=(name,), exitpriority=0
            )

    def _create(self) -> tuple[str, int]:
        prefix = instance_prefix()
        while True:
            name = f"{prefix}{os.getpid()}_{next(_counter)}_{secrets.token_hex(4)}"
            try:
                fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                continue
            break
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, self.total_bytes)  # zero-filled: every flag starts at 0
        except BaseException:
            os.close(fd)
            _unlink_quietly(name)
            raise
        return name, fd

    def chunk(self, i: int) -> memoryview:
        """Chunk ``i`` of the data area."""
        start = i * self.max_chunk_bytes
        return self.data[start : start + self.max_chunk_bytes]

    def row(self, i: int) -> int:
        """Offset of chunk ``i``'s metadata row in :attr:`meta` (written flag; read flags follow)."""
        return i * self.row_bytes

    def word_address(self, k: int) -> int:
        """Virtual address of ``words[k]`` in this process (for futex calls)."""
        return self._address + self.words_offset + 4 * k

    def unlink(self) -> None:
        """Remove the segment's name (owner only; idempotent). Existing mappings stay valid."""
        if self.is_owner and not self._unlinked:
            self._unlinked = True
            _unlink_quietly(self.name)
            if self._finalizer is not None:
                self._finalizer.cancel()

    def close(self) -> None:
        """Unmap (and, for the owner, unlink). Idempotent."""
        self.unlink()
        if self._mmap.closed:
            return
        for mv in (self.data, self.words, self.reader_words, self.meta, self._buf):
            mv.release()
        self._mmap.close()


def _unlink_quietly(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------- helpers


def _default_connect_ip() -> str:
    """This node's address for remote readers: env ``OMNI_HOST_IP``, else the outbound interface."""
    ip = os.environ.get("OMNI_HOST_IP")
    if ip:
        return ip
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.254.254.254", 1))  # UDP connect sends nothing; it only picks a route
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _as_bytes(f: Any) -> memoryview:
    mv = memoryview(f)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _inline_size(lengths: Sequence[int]) -> int:
    """Bytes a chunk needs to hold these frames inline (header + 64-byte aligned frames)."""
    pos = _align(_CHUNK_HEADER.size + 8 * len(lengths))
    for n in lengths:
        pos = _align(pos + n)
    return pos


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class _Wait:
    """Bookkeeping of one blocking wait: cancellation, the deadline, and a warning every ``warn_interval``
    while it waits without one. :meth:`tick` is called before every sleep and says how long it may last."""

    def __init__(self, mq: MessageQueue, start: float, deadline: float | None) -> None:
        self.mq = mq
        self.start = start
        self.deadline = deadline
        self.next_warn = start + mq.warn_interval
        self.delay = 50e-6

    def tick(self, timeout_message: Callable[[float], str], warning: Callable[[float], str]) -> float:
        """Raise if cancelled or past the deadline (``timeout_message(waited)``), log ``warning(waited)``
        when due; returns the longest sleep until something is due again (at most 1 s)."""
        self.mq._check_cancelled()
        now = time.monotonic()
        if self.deadline is not None:
            if now >= self.deadline:
                raise MessageQueueTimeout(timeout_message(now - self.start))
            return min(1.0, self.deadline - now)
        if now >= self.next_warn:
            logger.warning("%s", warning(now - self.start))
            self.next_warn += self.mq.warn_interval
        return min(1.0, self.next_warn - now)

    def backoff(self, limit: float) -> None:
        """Sleep (cancellable) with exponential backoff: 50 µs doubling up to 1 ms, 20 ms after the first
        second, never past ``limit`` seconds (what :meth:`tick` returned)."""
        cap = 1e-3 if time.monotonic() - self.start < 1.0 else 20e-3
        self.delay = min(self.delay * 2, cap, max(0.0, limit))
        self.mq._cancel.wait(self.delay)


# ----------------------------------------------------------------------------- message queue


class MessageQueue:
    """Broadcast msgspec/serde-encodable objects from one writer to ``n_reader`` readers, in order.

    The writer constructs it, ships :meth:`export_handle` to the readers (by any msgspec route), every
    reader calls :meth:`create_from_handle`, then *all* call :meth:`wait_until_ready`.

    - ``n_reader``: number of readers; ``n_local_reader`` of them share this node (ring buffer), the
      rest are remote (ZMQ over ``tcp://connect_ip``).
    - ``local_reader_ranks``: the ranks the local readers will pass to :meth:`create_from_handle`
      (default ``range(n_local_reader)``); any other rank attaches as a remote reader.
    - ``max_chunk_bytes`` / ``max_chunks``: ring geometry; larger payloads go through ZMQ.
    - ``connect_ip``: address remote readers connect to (default env ``OMNI_HOST_IP`` or this
      node's outbound interface); only used when there are remote readers.
    """

    spin_seconds: float = 1e-3
    """How long a waiting reader or writer spins (with ``sched_yield``) before it blocks."""
    warn_interval: float = 60.0
    """With ``timeout=None``, a warning is logged this often while still waiting."""
    close_linger_ms: int = 5000
    """How long ``close()`` lets queued ZMQ data (overflow / remote) drain to live readers."""
    remote_hwm: int = 64
    """Messages queued per remote reader (on each side of the connection) before ``enqueue`` waits."""
    use_futex: bool = HAS_FUTEX
    """Writer's choice of wake-up mechanism for local readers: futex words in the segment (Linux), or a
    ZMQ ping socket. Readers follow the writer (the handle says which)."""

    def __init__(
        self,
        n_reader: int,
        n_local_reader: int,
        local_reader_ranks: Sequence[int] | None = None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
        connect_ip: str | None = None,
    ) -> None:
        if not isinstance(n_reader, int) or n_reader < 0:
            raise ValueError(f"n_reader={n_reader!r} is not allowed: use an int >= 0")
        if not isinstance(n_local_reader, int) or not 0 <= n_local_reader <= n_reader:
            raise ValueError(f"n_local_reader={n_local_reader!r} is not allowed: use an int in [0, n_reader={n_reader}]")
        ranks = tuple(range(n_local_reader)) if local_reader_ranks is None else tuple(int(r) for r in local_reader_ranks)
        if len(ranks) != n_local_reader or len(set(ranks)) != len(ranks):
            raise ValueError(
                f"local_reader_ranks={list(ranks)} is not allowed: need {n_local_reader} distinct ranks "
                f"(n_local_reader={n_local_reader})"
            )
        self._common_init()
        self._is_writer = True
        self.n_reader = n_reader
        self.n_local_reader = n_local_reader
        self.n_remote_reader = n_reader - n_local_reader
        self.local_reader_ranks = ranks
        self.max_chunk_bytes = max_chunk_bytes
        self.max_chunks = max_chunks
        self._unique = f"{os.getpid()}-{secrets.token_hex(6)}"
        try:
            wake_addr = overflow_addr = remote_addr = None
            if n_local_reader > 0:
                self._ring = ShmRingBuffer(n_local_reader, max_chunk_bytes, max_chunks)
                self._zero_reads = bytes(n_local_reader)
                self._all_read = b"\x01" * n_local_reader
                self._no_sleepers = bytes(4 * n_local_reader)
                self._futex = self.use_futex
                if not self._futex:
                    # Wake-up pings: losing one when a queue is full is harmless (the reader then has
                    # pending pings and will wake anyway), so the high-water mark is small.
                    wake_addr = ipc_endpoint(f"mq-{self._unique}-wake")
                    self._wake = self._socket(zmq.XPUB, sndhwm=64, linger=0, bind=wake_addr)
                # Overflow payloads: never dropped (their number is bounded by max_chunks anyway).
                overflow_addr = ipc_endpoint(f"mq-{self._unique}-data")
                self._overflow = self._socket(zmq.XPUB, sndhwm=0, linger=self.close_linger_ms, bind=overflow_addr)
            if self.n_remote_reader > 0:
                ip = connect_ip or _default_connect_ip()
                # Bounded queue per remote reader, and no silent drops: a full queue makes enqueue wait.
                self._remote = self._socket(zmq.XPUB, sndhwm=self.remote_hwm, linger=self.close_linger_ms,
                                            options={zmq.XPUB_NODROP: 1}, bind=tcp_endpoint(ip, 0))
                remote_addr = self._remote.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self.close()
            raise
        self._handle = Handle(
            n_reader=n_reader,
            local_reader_ranks=ranks,
            buffer_name=None if self._ring is None else self._ring.name,
            max_chunk_bytes=max_chunk_bytes,
            max_chunks=max_chunks,
            local_wake_addr=wake_addr,
            local_overflow_addr=overflow_addr,
            remote_addr=remote_addr,
            writer_pid=os.getpid(),
        )

    def _common_init(self) -> None:
        self._ctx = new_context(io_threads=1)
        self._sockets: list[zmq.Socket] = []
        self._bound_ipc: list[str] = []
        self._ring: ShmRingBuffer | None = None
        self._futex = False
        self._wake: zmq.Socket | None = None
        self._overflow: zmq.Socket | None = None
        self._remote: zmq.Socket | None = None
        self._handle: Handle | None = None
        self._closed = False
        self._ready = False
        self._idx = 0
        self.num_blocks = 0  # times a reader (or the writer) stopped spinning and blocked; for tests/metrics
        self.num_late_wakeups = 0  # a blocked reader found a message only after its poll timed out (no ping)
        self._local = False  # a reader of the shared-memory ring
        self._writer_pid = 0  # local readers: the writer's pid, watched while they wait (0: not watched)
        self._cancel = threading.Event()
        self._cancel_lock = threading.Lock()
        addr = f"inproc://omni-mq-cancel-{id(self)}-{secrets.token_hex(4)}"
        self._cancel_rx = make_socket(zmq.PAIR, ctx=self._ctx, bind=addr)
        self._cancel_tx = make_socket(zmq.PAIR, ctx=self._ctx, connect=addr)

    def _socket(self, kind: int, *, sndhwm: int = DEFAULT_HWM, rcvhwm: int = DEFAULT_HWM, linger: int = 0,
                options: dict[int, int | bytes] | None = None, bind: str | None = None,
                connect: str | None = None) -> zmq.Socket:
        # The queue's own bounds (64 wake-ups, unbounded overflow, remote_hwm) are part of its protocol; the
        # rest is the house policy of comm.channel.make_socket.
        s = make_socket(kind, ctx=self._ctx, sndhwm=sndhwm, rcvhwm=rcvhwm, linger=linger, options=options,
                        bind=bind, connect=connect)
        self._sockets.append(s)
        if bind is not None and bind.startswith("ipc://"):
            self._bound_ipc.append(bind)
        return s

    # ------------------------------------------------------------------ construction (reader side)

    def export_handle(self) -> Handle:
        """The :class:`Handle` readers attach with (writer only)."""
        if not self._is_writer or self._handle is None:
            raise RuntimeError("export_handle() is only available on the writer")
        return self._handle

    @classmethod
    def create_from_handle(cls, handle: Handle, rank: int) -> MessageQueue:
        """Attach as a reader. ``rank`` in ``handle.local_reader_ranks`` reads the ring; any other is remote."""
        self = cls.__new__(cls)
        self._common_init()
        self._is_writer = False
        self._handle = handle
        self.n_reader = handle.n_reader
        self.local_reader_ranks = tuple(handle.local_reader_ranks)
        self.n_local_reader = len(self.local_reader_ranks)
        self.n_remote_reader = self.n_reader - self.n_local_reader
        self.max_chunk_bytes = handle.max_chunk_bytes
        self.max_chunks = handle.max_chunks
        self.rank = rank
        self._local = rank in self.local_reader_ranks
        # Local readers watch the writer's pid if it is visible from here (same pid namespace). Remote readers
        # do not: on another node that number may belong to any process.
        if self._local and handle.writer_pid > 0 and pid_alive(handle.writer_pid):
            self._writer_pid = handle.writer_pid
        try:
            if self._local:
                self._reader_index = self.local_reader_ranks.index(rank)
                if handle.buffer_name is None or handle.local_overflow_addr is None:
                    raise ValueError(f"handle has no shared-memory ring, but rank={rank} is a local reader")
                self._futex = handle.local_wake_addr is None
                if self._futex and not HAS_FUTEX:
                    raise RuntimeError("the writer wakes readers with futex(2), which this platform lacks")
                # Attach before subscribing: the writer unlinks the name once every subscription arrived.
                self._ring = ShmRingBuffer(self.n_local_reader, handle.max_chunk_bytes, handle.max_chunks,
                                           name=handle.buffer_name)
                self._read_flag = 1 + self._reader_index
                if not self._futex:
                    self._wake = self._socket(zmq.SUB, rcvhwm=64, options={zmq.SUBSCRIBE: b""},
                                              connect=handle.local_wake_addr)
                self._overflow = self._socket(zmq.SUB, rcvhwm=0, options={zmq.SUBSCRIBE: b""},
                                              connect=handle.local_overflow_addr)
            else:
                if handle.remote_addr is None:
                    raise ValueError(
                        f"rank={rank} is not in local_reader_ranks={list(self.local_reader_ranks)} and the "
                        f"queue has no remote readers"
                    )
                self._remote = self._socket(zmq.SUB, rcvhwm=self.remote_hwm, options={zmq.SUBSCRIBE: b""},
                                            connect=handle.remote_addr)
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def create_from_process_group(
        cls,
        group: Any,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
        writer_rank: int = 0,
        connect_ip: str | None = None,
        timeout: float | None = 300.0,
    ) -> MessageQueue:
        """Collective over a CPU (gloo) ``torch.distributed`` group: build the queue and attach every rank.

        ``group=None`` means the default (world) group. The set-up sends CPU tensors over ``group``: a group whose
        backend takes no CPU tensor (NCCL alone) is refused at once with a ``ValueError`` naming its backend.
        ``writer_rank`` is a rank *in the group*; readers use their group rank. Ranks on the writer's node
        (:func:`comm.node.node_id`: hostname, boot id, /dev/shm mount) become local readers, the others remote. The
        handle travels as msgspec bytes in a tensor broadcast (no pickle). Returns a ready queue on every rank.
        """
        import hashlib

        import torch
        import torch.distributed as dist

        if group is None:
            group = dist.group.WORLD
        backends = str(dist.get_backend_config(group))
        if "cpu:" not in backends:
            raise ValueError(f"create_from_process_group: the group's backend ({backends}) takes no CPU tensors, and "
                             "the queue's set-up sends its handle as CPU tensors; pass a gloo group (a mesh "
                             "coordinator's cpu_group)")
        ranks = dist.get_process_group_ranks(group)
        me = ranks.index(dist.get_rank())
        if not 0 <= writer_rank < len(ranks):
            raise ValueError(f"writer_rank={writer_rank} is not allowed: the group has ranks 0..{len(ranks) - 1}")
        node = node_id()
        node_hash = int.from_bytes(hashlib.sha256(node.encode()).digest()[:8], "little", signed=True)
        ids = [torch.zeros(1, dtype=torch.int64) for _ in ranks]
        dist.all_gather(ids, torch.tensor([node_hash], dtype=torch.int64), group=group)
        writer_node = int(ids[writer_rank])
        local = [r for r in range(len(ranks)) if r != writer_rank and int(ids[r]) == writer_node]
        src = ranks[writer_rank]
        mq = None
        if me == writer_rank:
            mq = cls(len(ranks) - 1, len(local), local, max_chunk_bytes, max_chunks, connect_ip)
            payload = msgspec.msgpack.encode(mq.export_handle())
            size = torch.tensor([len(payload)], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=src, group=group)
        if mq is not None:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        else:
            data = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(data, src=src, group=group)
        if mq is None:
            handle = msgspec.msgpack.decode(data.numpy().tobytes(), type=Handle)
            mq = cls.create_from_handle(handle, me)
        mq.wait_until_ready(timeout=timeout)
        return mq

    @property
    def is_writer(self) -> bool:
        return self._is_writer

    # ------------------------------------------------------------------ readiness

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Collective: the writer waits for every reader's subscriptions, then tells them it is ready.

        After this the writer has unlinked the shared-memory name (every local reader has mapped it).
        """
        if self._ready:
            return
        deadline = _deadline(timeout)
        if self._is_writer:
            expected = [(sock, self.n_local_reader) for sock in (self._wake, self._overflow) if sock is not None]
            if self._remote is not None:
                expected.append((self._remote, self.n_remote_reader))
            for sock, n in expected:
                seen = 0
                while seen < n:
                    self._poll_one(sock, deadline, "wait_until_ready", f"{seen} of {n} subscriptions")
                    msg = sock.recv()
                    if msg[:1] == b"\x01":
                        seen += 1
            for sock in (self._overflow, self._remote):
                if sock is not None:
                    sock.send(_READY)
            if self._ring is not None:
                self._ring.unlink()
        else:
            sock = self._overflow if self._local else self._remote
            self._poll_one(sock, deadline, "wait_until_ready", "the writer's READY message")
            msg = sock.recv()
            if msg != _READY:
                raise RuntimeError(f"expected the writer's READY message, got {msg[:32]!r}")
        self._ready = True

    def _poll_one(self, sock: zmq.Socket, deadline: float | None, what: str, waiting_for: str) -> None:
        """Block until ``sock`` is readable; honours cancellation, the deadline and the warn interval.

        A local reader also gives up (:class:`MessageQueueCancelled`) once the writer process is gone: an
        overflow payload announced in the ring but not yet delivered when the writer was killed never comes.
        """
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._cancel_rx, zmq.POLLIN)
        w = _Wait(self, time.monotonic(), deadline)
        while True:
            wait = w.tick(lambda s: f"{what}: timed out after {s:.1f}s waiting for {waiting_for}",
                          lambda s: f"{what}: still waiting for {waiting_for} after {s:.0f}s")
            events = dict(poller.poll(max(0, int(wait * 1000) + 1)))
            if sock in events:
                return
            if not events:
                self._check_writer_alive()

    def _check_usable(self, op: str, writer: bool) -> None:
        """``op`` belongs to the writer (or to readers), needs a ready queue that is neither closed nor shut down."""
        if self._is_writer != writer:
            raise RuntimeError(f"{op}() is only available on {'the writer' if writer else 'readers'}")
        if self._closed:
            raise RuntimeError(f"{op}() on a closed MessageQueue")
        if not self._ready:
            raise RuntimeError(f"{op}() before wait_until_ready()")
        self._check_cancelled()

    def _check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise MessageQueueCancelled("the message queue was shut down")

    def _check_writer_alive(self) -> None:
        """Local readers: a writer that exited will never publish again (checked once a second while idle)."""
        pid = self._writer_pid
        if pid > 0 and not pid_alive(pid):
            raise MessageQueueCancelled(f"the writer process (pid {pid}) exited; no more messages will arrive")

    # ------------------------------------------------------------------ writer

    def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        """Broadcast ``obj`` to every reader (writer only). Blocks while the ring is full.

        Raises :class:`MessageQueueTimeout` naming the readers that have not consumed the oldest chunk
        when ``timeout`` seconds pass; ``timeout=None`` waits forever (warning every 60 s). The ring is
        written before the remote socket, so a timeout on a full remote queue comes after the local
        readers already have the message: do not retry it (they would get it twice); treat the queue as
        broken, as after any timeout.
        """
        self._check_usable("enqueue", writer=True)
        frames = [_as_bytes(f) for f in serde.encode(obj)]
        deadline = _deadline(timeout)
        if self._ring is not None:
            self._write_local(frames, deadline)
        if self._remote is not None:
            self._send_remote(frames, deadline)

    def _send_remote(self, frames: list[memoryview], deadline: float | None) -> None:
        # copy=True: the caller may mutate its tensors as soon as enqueue returns.
        try:
            self._remote.send_multipart(frames, flags=zmq.NOBLOCK, copy=True)
            return
        except zmq.Again:
            pass
        # A remote reader's queue is full (XPUB_NODROP: nothing was sent). PUB sockets always report
        # POLLOUT, so wait with backoff sleeps and retry.
        self.num_blocks += 1
        w = _Wait(self, time.monotonic(), deadline)
        while True:
            w.backoff(w.tick(
                lambda s: (f"enqueue: timed out after {s:.1f}s: a remote reader's queue stayed full "
                           f"({self.remote_hwm} messages; a remote reader stopped dequeuing or is unreachable)"),
                lambda s: f"enqueue: still waiting after {s:.0f}s for a remote reader to drain its queue"))
            try:
                self._remote.send_multipart(frames, flags=zmq.NOBLOCK, copy=True)
                return
            except zmq.Again:
                continue

    def _write_local(self, frames: list[Any], deadline: float | None) -> None:
        ring = self._ring
        idx = self._idx
        row = ring.row(idx)
        meta = ring.meta
        self._wait_chunk_free(idx, deadline)
        lengths = [f.nbytes for f in frames]
        meta[row] = 0
        chunk = ring.chunk(idx)
        if _inline_size(lengths) <= ring.max_chunk_bytes:
            _CHUNK_HEADER.pack_into(chunk, 0, _KIND_INLINE, len(frames))
            struct.pack_into(f"<{len(frames)}Q", chunk, _CHUNK_HEADER.size, *lengths)
            pos = _align(_CHUNK_HEADER.size + 8 * len(frames))
            for f, n in zip(frames, lengths, strict=True):
                chunk[pos : pos + n] = f
                pos = _align(pos + n)
        else:
            _CHUNK_HEADER.pack_into(chunk, 0, _KIND_OVERFLOW, len(frames))
            self._overflow.send_multipart(frames, copy=True)  # sent before the flag that announces it
        chunk.release()
        meta[row + 1 : row + 1 + ring.n_reader] = self._zero_reads
        meta[row] = 1  # publish
        _fence()
        if ring.reader_words != self._no_sleepers:
            self._wake_readers()
        self._idx = (idx + 1) % ring.max_chunks

    def _wake_readers(self) -> None:
        ring = self._ring
        if self._futex:
            words = ring.words
            for i in range(ring.n_reader):
                if words[i]:
                    words[i] = 0  # the reader re-arms it before it checks the ring again
                    _futex_wake(ring.word_address(i))
        else:
            try:
                self._wake.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # a full ping queue already wakes that reader

    def _chunk_free(self, row: int) -> bool:
        meta = self._ring.meta
        return meta[row] == 0 or meta[row + 1 : row + 1 + self._ring.n_reader] == self._all_read

    def _spin(self, ready: Callable[[int], bool], row: int) -> float | None:
        """Wait for ``ready(row)`` by spinning for at most :attr:`spin_seconds`, yielding the CPU between
        checks. Returns None once it holds, else the time the wait began (the caller then blocks)."""
        if ready(row):
            return None
        start = time.monotonic()
        spin_until = start + self.spin_seconds
        while time.monotonic() < spin_until:
            os.sched_yield()
            if ready(row):
                return None
            self._check_cancelled()
        self.num_blocks += 1
        return start

    def _wait_chunk_free(self, idx: int, deadline: float | None) -> None:
        row = self._ring.row(idx)
        start = self._spin(self._chunk_free, row)
        if start is None:
            return
        w = _Wait(self, start, deadline)

        def timed_out(waited: float) -> str:
            return (f"enqueue: timed out after {waited:.1f}s: chunk {idx} has not been read by reader "
                    f"rank(s) {self._laggards(row)} (a reader that died or stopped dequeuing blocks the writer)")

        def warning(waited: float) -> str:
            return f"enqueue: still waiting after {waited:.0f}s for reader rank(s) {self._laggards(row)} to read chunk {idx}"

        if not self._futex:
            while not self._chunk_free(row):
                w.backoff(w.tick(timed_out, warning))
            return
        # Futex mode: sleep on the writer's word; a reader that releases a chunk wakes us.
        ring = self._ring
        word = ring.writer_word
        addr = ring.word_address(word)
        ring.words[word] = 1
        _fence()
        try:
            while not self._chunk_free(row):
                _futex_wait(addr, 1, w.tick(timed_out, warning))
                ring.words[word] = 1  # re-arm (a waking reader cleared it), then re-check
                _fence()
        finally:
            ring.words[word] = 0

    def _laggards(self, row: int) -> list[int]:
        meta = self._ring.meta
        return [r for i, r in enumerate(self.local_reader_ranks) if meta[row + 1 + i] == 0]

    # ------------------------------------------------------------------ reader

    def dequeue(self, timeout: float | None = None) -> Any:
        """Receive the next object (reader only), in the writer's order.

        Raises :class:`MessageQueueTimeout` after ``timeout`` seconds and :class:`MessageQueueCancelled`
        when :meth:`shutdown` is called meanwhile.
        """
        self._check_usable("dequeue", writer=False)
        deadline = _deadline(timeout)
        if not self._local:
            self._poll_one(self._remote, deadline, "dequeue", "the next message")
            frames = self._remote.recv_multipart(copy=False)
            if len(frames) == 1 and len(frames[0]) == 0:
                self._cancel.set()
                raise MessageQueueCancelled("the writer closed the queue; no more messages will arrive")
            return serde.decode(frames)
        ring = self._ring
        idx = self._idx
        row = ring.row(idx)
        self._wait_chunk_ready(row, deadline)
        chunk = ring.chunk(idx)
        try:
            kind, n = _CHUNK_HEADER.unpack_from(chunk, 0)
            if kind == _KIND_INLINE:
                lengths = struct.unpack_from(f"<{n}Q", chunk, _CHUNK_HEADER.size)
                start = pos = _align(_CHUNK_HEADER.size + 8 * n)
                spans = []
                for length in lengths:
                    spans.append((pos - start, length))
                    pos = _align(pos + length)
                copy = bytearray(chunk[start:pos])  # one copy out; the writer may reuse the chunk after this
                view = memoryview(copy)
                frames: list[Any] = [view[a : a + length] for a, length in spans]
            elif kind == _KIND_OVERFLOW:
                self._poll_one(self._overflow, None, "dequeue", "an overflow payload")
                frames = self._overflow.recv_multipart(copy=False)
            else:
                raise RuntimeError(f"corrupt chunk {idx}: kind byte {kind} (allowed {_KIND_INLINE}, {_KIND_OVERFLOW})")
        finally:
            chunk.release()
            ring.meta[row + self._read_flag] = 1  # release the chunk for this reader
            self._idx = (idx + 1) % ring.max_chunks
            if self._futex:
                _fence()
                words = ring.words
                if words[ring.writer_word]:  # the writer sleeps on a full ring
                    words[ring.writer_word] = 0
                    _futex_wake(ring.word_address(ring.writer_word))
        return serde.decode(frames)

    def _chunk_ready(self, row: int) -> bool:
        meta = self._ring.meta
        return meta[row] == 1 and meta[row + self._read_flag] == 0

    def _wait_chunk_ready(self, row: int, deadline: float | None) -> None:
        start = self._spin(self._chunk_ready, row)
        if start is None:
            return
        # Block: announce we sleep, fence, then (drain pings ->) re-check -> sleep (see module docstring).
        ring = self._ring
        words = ring.words
        me = self._reader_index
        addr = ring.word_address(me)
        poller = None
        if not self._futex:
            poller = zmq.Poller()
            poller.register(self._wake, zmq.POLLIN)
            poller.register(self._cancel_rx, zmq.POLLIN)
        w = _Wait(self, start, deadline)
        next_liveness = start + 1.0
        words[me] = 1
        _fence()
        poll_timed_out = False
        try:
            while True:
                if poller is not None:
                    try:
                        while True:
                            self._wake.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                closed = words[ring.closed_word]  # load before the chunk flags: all publishes before close are seen
                if self._chunk_ready(row):
                    self.num_late_wakeups += poll_timed_out
                    return
                self._check_cancelled()
                if closed:
                    raise MessageQueueCancelled("the writer closed the queue; no more messages will arrive")
                wait = w.tick(lambda s: f"dequeue: no message within {s:.1f}s",
                              lambda s: f"dequeue: still waiting for the next message after {s:.0f}s")
                now = time.monotonic()
                if now >= next_liveness:
                    self._check_writer_alive()
                    next_liveness = now + 1.0
                if poller is None:
                    poll_timed_out = _futex_wait(addr, 1, wait)
                    words[me] = 1  # re-arm (the writer cleared it to wake us), then re-check
                    _fence()
                else:
                    poll_timed_out = not poller.poll(max(0, int(wait * 1000) + 1))
        finally:
            words[me] = 0

    # ------------------------------------------------------------------ both

    def broadcast_object(self, obj: Any = None) -> Any:
        """Writer: enqueue ``obj`` and return it. Reader: return the next object."""
        if self._is_writer:
            self.enqueue(obj)
            return obj
        return self.dequeue()

    def shutdown(self) -> None:
        """Cancel any blocked or future ``enqueue``/``dequeue`` (callable from any thread)."""
        self._cancel.set()
        with self._cancel_lock:
            if self._closed:
                return
            try:
                self._cancel_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            ring = self._ring
            if self._futex and ring is not None:
                word = ring.writer_word if self._is_writer else self._reader_index
                ring.words[word] = 0  # the sleeper re-arms, re-checks and sees the cancellation
                _futex_wake(ring.word_address(word))

    def _announce_close(self) -> None:
        """Tell blocked readers that nothing more will come (after everything already published)."""
        try:
            ring = self._ring
            if ring is not None:
                ring.words[ring.closed_word] = 1
                _fence()
                if self._futex:
                    for i in range(ring.n_reader):
                        ring.words[i] = 0
                        _futex_wake(ring.word_address(i))
                else:
                    self._wake.send(b"", zmq.NOBLOCK)
            if self._remote is not None:
                self._remote.send(_CLOSED, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # a full queue: that reader learns it from its timeout or the writer's exit instead

    def close(self) -> None:
        """Release everything; the writer unlinks the segment and tells readers it closed. Idempotent.

        Readers still receive every message enqueued before ``close()``; a reader blocked after the last
        one raises :class:`MessageQueueCancelled`.
        """
        with self._cancel_lock:
            if self._closed:
                return
            self._closed = True
            self._cancel.set()
        if self._is_writer and self._ready:
            self._announce_close()
        for s in self._sockets:
            s.close()
        self._cancel_tx.close(linger=0)
        self._cancel_rx.close(linger=0)
        self._ctx.term()
        for ep in self._bound_ipc:
            unlink_ipc(ep)
        if self._ring is not None:
            self._ring.close()

    def __enter__(self) -> MessageQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "writer" if self._is_writer else f"reader rank {self.rank}"
        return (f"MessageQueue({role}, n_reader={self.n_reader}, n_local_reader={self.n_local_reader}, "
                f"max_chunk_bytes={self.max_chunk_bytes}, max_chunks={self.max_chunks})")
