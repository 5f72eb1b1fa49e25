"""Stage-to-stage tensor handoff on one node through POSIX shared memory.

The producer calls :func:`put` (one copy into a fresh ``/dev/shm`` segment) and
sends the returned :class:`ShmHandle` (a small msgspec Struct) over any
channel; the consumer calls :func:`get` and receives tensors that are views of
the mapped segment (no copy). The mapping stays alive for as long as any of
those tensors lives.

Lifetime: every segment has exactly one owner, the process that created it.
It is unlinked once, by whichever comes first:

- :func:`release` by the consumer (or anyone holding the handle);
- :func:`shutdown` / interpreter exit of the owner, which unlinks everything
  the owner still has;
- :func:`sweep` by the launcher, for segments whose creating process died
  without cleaning up (SIGKILL, OOM).

Unlinking an already-unlinked segment is harmless, and existing mappings stay
valid after unlink (POSIX semantics), so a consumer may keep reading.

:class:`ShmPool` is the fast path for a producer that hands off tensors again
and again: a released segment goes back to the producer's pool instead of being
unlinked, so the next put skips the kernel's page allocation and zeroing (one
memcpy instead of page faults + memcpy). Its segments are owned and unlinked by
the producer (pool close, shutdown, sweep). See its docstring for the one rule
it adds: a pooled handle has one consumer, who stops using the views after release.

Segment layout: a 64-byte header (magic, state, generation), then each tensor at
a 64-byte aligned offset.

Names are ``omni_<instance>_<pid>_<counter>_<nonce>`` where ``instance`` comes
from the environment variable ``OMNI_RUNTIME_INSTANCE`` (set by the launcher;
when unset the first process that needs it derives it from its pid and exports
it, so its children share the prefix). Files are created with mode 0600.

We deliberately do not use :mod:`multiprocessing.shared_memory`: its resource
tracker unlinks segments when the *opening* process exits and warns about
"leaked" segments that another process owns.
"""

from __future__ import annotations

import atexit
import logging
import mmap
import multiprocessing.util
import os
import re
import secrets
import stat
import struct
import threading
from collections.abc import Iterable, Mapping

import msgspec
import torch

from omni_runtime.comm.dtypes import TORCH_DTYPES
from omni_runtime.comm.dtypes import dtype_name as dtype_name_or_raise
from omni_runtime.comm.instance import INSTANCE_ENV, check_instance, instance_id  # noqa: F401 (re-exported)
from omni_runtime.comm.processes import pid_alive  # noqa: F401 (re-exported)
from omni_runtime.comm.tensor_meta import TensorMeta

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
ALIGNMENT = 64
HEADER_BYTES = 64
_MAX_TENSORS = 4096

# Segment header: magic, state, generation. The consumer flips the state to _FREE on release of a pooled
# handle; the pool reuses only _FREE segments, bumping the generation.
_HEADER = struct.Struct("<4sB3xQ")
_MAGIC = b"OMNI"
_STATE_OFFSET = 4
_IN_USE = 1
_FREE = 2

_NAME_RE = re.compile(r"^omni_([A-Za-z0-9.-]{1,64})_(\d{1,10})_(\d{1,20})_([0-9a-f]{8})$")

class ShmHandleError(ValueError):
    """A handle that does not describe a valid live segment (forged, corrupt, or already released)."""


class TensorSlot(msgspec.Struct, frozen=True, array_like=True):
    """Where one tensor (``meta``: :class:`comm.tensor_meta.TensorMeta`) lies inside a segment."""

    key: str
    meta: TensorMeta
    offset: int

    @property
    def nbytes(self) -> int:
        return self.meta.nbytes


class ShmHandle(msgspec.Struct, frozen=True, tag="shm"):
    """What the consumer needs to map a segment. Small; send it over any msgspec channel."""

    name: str
    owner_pid: int
    total_bytes: int
    tensors: tuple[TensorSlot, ...]
    is_dict: bool = False
    generation: int = 0
    pooled: bool = False


# --------------------------------------------------------------------------- names


def instance_prefix(instance: str | None = None) -> str:
    """Name prefix of every segment of a runtime instance (default: this one), e.g. ``omni_p1234_``."""
    inst = instance_id() if instance is None else check_instance(instance)
    return f"omni_{inst}_"


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


# --------------------------------------------------------------------------- ownership


class _Owned:
    """Names of the segments this process created and has not unlinked yet."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: set[str] = set()
        self.pid = os.getpid()
        self.counter = 0
        self.prune_at = 1024
        self.hooked = False

    def reset_after_fork(self) -> None:
        # A forked child does not own its parent's segments.
        self.__init__()

    def add(self, name: str) -> None:
        with self.lock:
            if not self.hooked:
                # multiprocessing children leave through os._exit, which skips atexit; their
                # exit path runs multiprocessing's finalizers instead (registered per process).
                multiprocessing.util.Finalize(None, shutdown, exitpriority=0)
                self.hooked = True
            self.names.add(name)
            if len(self.names) >= self.prune_at:
                # Consumers release most segments; forget the ones already gone so the set stays small.
                self.names = {n for n in self.names if os.path.exists(_path(n))}
                self.prune_at = max(1024, 2 * len(self.names))

    def next_counter(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter


_owned = _Owned()
os.register_at_fork(after_in_child=_owned.reset_after_fork)


def _unlink(name: str) -> bool:
    try:
        os.unlink(_path(name))
        return True
    except FileNotFoundError:
        return False
    except PermissionError:  # another user's segment in the sticky /dev/shm: not ours to remove
        logger.debug("shm segment %s belongs to another user; left alone", name)
        return False


def shutdown() -> None:
    """Unlink every segment this process created and still owns. Called at interpreter exit."""
    if _owned.pid != os.getpid():
        return
    with _owned.lock:
        names, _owned.names = _owned.names, set()
    n = sum(_unlink(name) for name in names)
    if n:
        logger.debug("unlinked %d shm segment(s) at shutdown", n)


atexit.register(shutdown)


# --------------------------------------------------------------------------- put / get / release


def _as_items(obj: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple[list[tuple[str, torch.Tensor]], bool]:
    if isinstance(obj, torch.Tensor):
        return [("", obj)], False
    if isinstance(obj, Mapping):
        items = []
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"put: dict key {k!r} has type {type(k).__name__}; only str keys are allowed")
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"put: value for key {k!r} has type {type(v).__name__}; only torch.Tensor is allowed")
            items.append((k, v))
        if len(items) > _MAX_TENSORS:
            raise ValueError(f"put: {len(items)} tensors in one dict; at most {_MAX_TENSORS} are allowed")
        return items, True
    raise TypeError(f"put: got {type(obj).__name__}; expected a torch.Tensor or a dict[str, torch.Tensor]")


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _create_segment(size: int) -> tuple[str, int]:
    prefix = instance_prefix()
    pid = os.getpid()
    while True:
        name = f"{prefix}{pid}_{_owned.next_counter()}_{secrets.token_hex(4)}"
        try:
            fd = os.open(_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        break
    try:
        os.fchmod(fd, 0o600)  # exact, whatever the umask
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        _unlink(name)
        raise
    return name, fd


def _mmap(fd: int, size: int) -> mmap.mmap:
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _view(buf: mmap.mmap, slot: TensorSlot) -> torch.Tensor:
    dtype, shape, nbytes = slot.meta.torch_dtype(), slot.meta.shape, slot.nbytes
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=slot.offset)
    return flat.view(dtype).view(shape)


def _layout(items: list[tuple[str, torch.Tensor]]) -> tuple[list[TensorSlot], int]:
    """Offsets of each tensor after the segment header; returns the slots and the segment size."""
    metas: list[TensorSlot] = []
    offset = HEADER_BYTES
    for key, t in items:
        try:
            meta = TensorMeta(dtype_name_or_raise(t.dtype), tuple(t.shape))
        except ValueError:
            raise TypeError(
                f"put: tensor {key!r} has dtype {t.dtype}; allowed dtypes are {sorted(TORCH_DTYPES)}"
            ) from None
        nbytes = meta.nbytes
        metas.append(TensorSlot(key, meta, offset))
        offset = _align(offset + nbytes)
    return metas, offset


@torch.no_grad()
def _fill(buf: mmap.mmap, metas: list[TensorSlot], items: list[tuple[str, torch.Tensor]]) -> None:
    for meta, (_, t) in zip(metas, items, strict=True):
        if meta.nbytes:
            _view(buf, meta).copy_(t)


def _new_segment(size: int) -> tuple[str, mmap.mmap]:
    name, fd = _create_segment(size)
    try:
        buf = _mmap(fd, size)
    except BaseException:
        _unlink(name)
        raise
    finally:
        os.close(fd)
    _owned.add(name)
    return name, buf


def put(obj: torch.Tensor | Mapping[str, torch.Tensor]) -> ShmHandle:
    """Copy a tensor (or a dict of tensors) into a new shared-memory segment this process owns.

    Tensors may be on any device and non-contiguous; they are stored contiguous,
    each at a 64-byte aligned offset. Returns the handle to pass to :func:`get`.
    The consumer's :func:`release` unlinks the segment.
    """
    items, is_dict = _as_items(obj)
    metas, size = _layout(items)
    name, buf = _new_segment(size)
    try:
        _HEADER.pack_into(buf, 0, _MAGIC, _IN_USE, 0)
        _fill(buf, metas, items)
    except BaseException:
        release_owned(name)
        raise
    # `buf` is dropped here; the views that filled it are gone, so the mapping is released.
    return ShmHandle(name, os.getpid(), size, tuple(metas), is_dict)


class _PoolSegment:
    __slots__ = ("name", "size", "buf", "generation")

    def __init__(self, name: str, size: int, buf: mmap.mmap) -> None:
        self.name, self.size, self.buf, self.generation = name, size, buf, 0

    def state(self) -> int:
        return self.buf[_STATE_OFFSET]


class ShmPool:
    """A producer-side pool of segments that are reused once their consumer released them.

    Writing into a fresh segment pays for the kernel allocating and zeroing every
    page (on virtual machines often slower than the copy itself); a reused segment
    is already mapped and faulted in, so :meth:`put` is one memcpy. Semantics differ
    from :func:`put` in one way: :func:`release` of a pooled handle does not unlink
    the segment but hands it back to this pool, so **a pooled handle must have
    exactly one consumer, and its views must not be used after release** (the
    memory will be overwritten by a later put). Each reuse bumps a generation
    number stored in the segment; :func:`get` of an outdated handle raises.

    Segments stay owned by this process: :meth:`close`, :func:`shutdown` and the
    launcher's :func:`sweep` unlink them. At most ``max_bytes`` are kept; free
    segments are unlinked (least recently used first) to stay under it, and a put
    that does not fit even then still gets a fresh segment.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes!r} must be an int >= 0")
        self.max_bytes = max_bytes
        self._segments: dict[str, _PoolSegment] = {}  # insertion order = least recently used first
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @property
    def pooled_bytes(self) -> int:
        return sum(s.size for s in self._segments.values())

    def put(self, obj: torch.Tensor | Mapping[str, torch.Tensor]) -> ShmHandle:
        """Like :func:`put`, reusing a released segment of this pool when one is large enough."""
        if self._pid != os.getpid():
            raise RuntimeError("ShmPool.put in a forked child: the pool belongs to the parent process")
        items, is_dict = _as_items(obj)
        metas, size = _layout(items)
        with self._lock:
            seg = self._take_free(size)
            if seg is None:
                self._evict(size)
                if self.pooled_bytes + size > self.max_bytes:
                    return put(obj)  # does not fit the pool: a plain segment, unlinked by its release
                name, buf = _new_segment(size)
                seg = _PoolSegment(name, size, buf)
                self._segments[name] = seg
            seg.generation += 1
            _HEADER.pack_into(seg.buf, 0, _MAGIC, _IN_USE, seg.generation)
        _fill(seg.buf, metas, items)
        return ShmHandle(seg.name, os.getpid(), seg.size, tuple(metas), is_dict,
                         generation=seg.generation, pooled=True)

    def _take_free(self, size: int) -> _PoolSegment | None:
        # Smallest free segment that fits and is not wastefully large (at most 2x the request).
        best = None
        for seg in self._segments.values():
            if seg.state() == _FREE and size <= seg.size <= 2 * size and (best is None or seg.size < best.size):
                best = seg
        if best is not None:
            self._segments[best.name] = self._segments.pop(best.name)  # most recently used
        return best

    def _evict(self, size: int) -> None:
        for seg in list(self._segments.values()):
            if self.pooled_bytes + size <= self.max_bytes:
                return
            if seg.state() == _FREE:
                del self._segments[seg.name]
                release_owned(seg.name)

    def close(self) -> None:
        """Unlink every segment of this pool (views held by consumers stay readable)."""
        with self._lock:
            segments, self._segments = self._segments, {}
        for seg in segments.values():
            release_owned(seg.name)


def release_owned(name: str) -> bool:
    """Owner side: unlink a segment this process created and forget it."""
    with _owned.lock:
        _owned.names.discard(name)
    return _unlink(name)


class _ConsumerMaps:
    """Consumer-side cache of mappings of pooled segments (they are mapped again and again)."""

    max_entries = 32

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.maps: dict[str, tuple[int, mmap.mmap]] = {}  # name -> (inode, mapping)
        self.released: set[tuple[str, int]] = set()

    def lookup(self, name: str) -> mmap.mmap | None:
        with self.lock:
            hit = self.maps.get(name)
        if hit is None:
            return None
        try:
            if os.stat(_path(name)).st_ino == hit[0]:
                return hit[1]
        except FileNotFoundError:
            pass
        with self.lock:
            self.maps.pop(name, None)
        return None

    def store(self, name: str, inode: int, buf: mmap.mmap) -> None:
        self.prune()
        with self.lock:
            self.maps[name] = (inode, buf)
            while len(self.maps) > self.max_entries:
                self.maps.pop(next(iter(self.maps)))

    def prune(self) -> None:
        """Drop mappings of segments their owner has unlinked (a cached mapping would pin their memory)."""
        with self.lock:
            items = list(self.maps.items())
        for name, (inode, _) in items:
            try:
                alive = os.stat(_path(name)).st_ino == inode
            except FileNotFoundError:
                alive = False
            if not alive:
                with self.lock:
                    self.maps.pop(name, None)


_consumer_maps = _ConsumerMaps()
os.register_at_fork(after_in_child=_consumer_maps.__init__)


def _check_handle(handle: ShmHandle) -> None:
    if not isinstance(handle, ShmHandle):
        raise ShmHandleError(f"get: expected a ShmHandle, got {type(handle).__name__}")
    m = _NAME_RE.match(handle.name) if isinstance(handle.name, str) else None
    if m is None:
        raise ShmHandleError(
            f"handle.name={handle.name!r} is not a segment name of ours (omni_<instance>_<pid>_<n>_<nonce>)"
        )
    if int(m.group(2)) != handle.owner_pid:
        raise ShmHandleError(
            f"handle.owner_pid={handle.owner_pid} does not match the pid {m.group(2)} in name {handle.name!r}"
        )
    if not isinstance(handle.generation, int) or not isinstance(handle.pooled, bool):
        raise ShmHandleError(f"handle.generation={handle.generation!r} / pooled={handle.pooled!r} are malformed")
    if not isinstance(handle.total_bytes, int) or handle.total_bytes < HEADER_BYTES:
        raise ShmHandleError(f"handle.total_bytes={handle.total_bytes!r} must be a positive int")
    if len(handle.tensors) > _MAX_TENSORS:
        raise ShmHandleError(f"handle has {len(handle.tensors)} tensors; at most {_MAX_TENSORS} are allowed")
    if not handle.is_dict and len(handle.tensors) != 1:
        raise ShmHandleError(f"a single-tensor handle must describe 1 tensor, not {len(handle.tensors)}")
    keys = set()
    for meta in handle.tensors:
        if not isinstance(meta, TensorSlot) or not isinstance(meta.offset, int) or not isinstance(meta.key, str) \
                or not isinstance(meta.meta, TensorMeta) or not isinstance(meta.meta.dtype, str):
            raise ShmHandleError(f"handle.tensors holds a malformed entry: {meta!r}")
        if meta.meta.dtype not in TORCH_DTYPES:
            raise ShmHandleError(
                f"tensor {meta.key!r}: dtype={meta.meta.dtype!r} is not one of {sorted(TORCH_DTYPES)}")
        try:
            meta.meta.validate()
        except ValueError as e:
            raise ShmHandleError(f"tensor {meta.key!r}: {e}") from None
        if meta.offset < HEADER_BYTES or meta.offset % ALIGNMENT or meta.offset + meta.nbytes > handle.total_bytes:
            raise ShmHandleError(
                f"tensor {meta.key!r}: offset={meta.offset} nbytes={meta.nbytes} must be {ALIGNMENT}-aligned, "
                f"after the {HEADER_BYTES}-byte header and inside the segment of {handle.total_bytes} bytes"
            )
        if meta.key in keys:
            raise ShmHandleError(f"tensor key {meta.key!r} appears twice in the handle")
        keys.add(meta.key)


def _open_checked(handle: ShmHandle) -> tuple[mmap.mmap, int]:
    try:
        fd = os.open(_path(handle.name), os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ShmHandleError(
            f"shm segment {handle.name!r} does not exist (already released, or its owner exited)"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ShmHandleError(f"shm segment {handle.name!r} is not a regular file owned by this user")
        if st.st_size != handle.total_bytes:
            raise ShmHandleError(
                f"handle.total_bytes={handle.total_bytes} but segment {handle.name!r} has {st.st_size} bytes"
            )
        return _mmap(fd, handle.total_bytes), st.st_ino
    finally:
        os.close(fd)


def _mapping(handle: ShmHandle) -> mmap.mmap:
    if not handle.pooled:
        return _open_checked(handle)[0]
    buf = _consumer_maps.lookup(handle.name)
    if buf is None:
        buf, inode = _open_checked(handle)
        _consumer_maps.store(handle.name, inode, buf)
    return buf


def get(handle: ShmHandle) -> torch.Tensor | dict[str, torch.Tensor]:
    """Map the segment of ``handle`` and return zero-copy views of its tensors.

    Returns a tensor for a handle made from a tensor and a dict for one made
    from a dict. The views are writable. For a handle from :func:`put` they stay
    valid after the segment is released (the mapping lives as long as the
    tensors); for a pooled handle (:class:`ShmPool`) they must not be used after
    release. Raises :class:`ShmHandleError` for a forged or stale handle.
    """
    _check_handle(handle)
    buf = _mapping(handle)
    magic, state, generation = _HEADER.unpack_from(buf, 0)
    if magic != _MAGIC:
        raise ShmHandleError(f"shm segment {handle.name!r} has no omni header")
    if generation != handle.generation or state != _IN_USE:
        raise ShmHandleError(
            f"stale handle for {handle.name!r}: generation {handle.generation}, but the segment holds "
            f"generation {generation} ({'released' if state == _FREE else 'in use'})"
        )
    # Each view holds a buffer export of `buf`, which keeps the mapping alive as long as any view lives.
    views = {meta.key: _view(buf, meta) for meta in handle.tensors}
    del buf
    if handle.is_dict:
        return views
    return views[handle.tensors[0].key]


def release(handle: ShmHandle) -> bool:
    """The consumer is done with ``handle``; returns whether this call released it.

    For a handle from :func:`put`: unlinks the segment (harmless if already
    unlinked; views already returned by :func:`get` stay valid). For a pooled
    handle: marks the segment free for its pool to reuse (a second release, or a
    release of an outdated generation, is ignored).
    """
    if not isinstance(handle, ShmHandle) or _NAME_RE.match(str(handle.name)) is None:
        raise ShmHandleError(f"release: not a valid ShmHandle: {handle!r}")
    if not handle.pooled:
        done = _unlink(handle.name)
        if handle.owner_pid == os.getpid():
            with _owned.lock:
                _owned.names.discard(handle.name)
        return done
    key = (handle.name, handle.generation)
    with _consumer_maps.lock:
        if key in _consumer_maps.released:
            return False
    try:
        buf = _mapping(handle)
    except ShmHandleError:
        return False  # the owner already unlinked it
    magic, state, generation = _HEADER.unpack_from(buf, 0)
    if magic != _MAGIC or generation != handle.generation or state != _IN_USE:
        return False
    buf[_STATE_OFFSET] = _FREE
    del buf
    _consumer_maps.prune()
    with _consumer_maps.lock:
        _consumer_maps.released.add(key)
        if len(_consumer_maps.released) > 4096:
            _consumer_maps.released.clear()  # only guards against an immediate double release
    return True


# --------------------------------------------------------------------------- sweeping


def list_segments(prefix: str | None = None) -> list[str]:
    """Names of the shm segments under ``prefix`` (default: this instance's prefix)."""
    prefix = instance_prefix() if prefix is None else prefix
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in entries if n.startswith(prefix) and _NAME_RE.match(n))


def sweep(prefix: str | None = None, pids: Iterable[int] | None = None, *, include_live: bool = False) -> list[str]:
    """Unlink segments under ``prefix`` whose creating process is dead; returns the names unlinked.

    ``prefix`` defaults to this instance's prefix. With ``pids``, only segments
    created by those pids are considered (the launcher passes the pid of a child
    that just died). ``include_live=True`` also removes segments of live
    processes (for the launcher's final sweep once every child is gone).
    """
    wanted = None if pids is None else {int(p) for p in pids}
    alive: dict[int, bool] = {}
    removed = []
    for name in list_segments(prefix):
        m = _NAME_RE.match(name)
        pid = int(m.group(2))
        if wanted is not None and pid not in wanted:
            continue
        if not include_live:
            if pid not in alive:
                alive[pid] = pid_alive(pid)
            if alive[pid]:
                continue
        if _unlink(name):
            removed.append(name)
    if removed:
        logger.info("swept %d shm segment(s) under %r", len(removed), prefix)
    return removed
