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
import math
import mmap
import multiprocessing.util
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterable, Mapping

import msgspec
import torch

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
ALIGNMENT = 64
INSTANCE_ENV = "OMNI_RUNTIME_INSTANCE"
_MAX_DIMS = 64
_MAX_TENSORS = 4096

_INSTANCE_RE = re.compile(r"^[A-Za-z0-9.-]{1,64}$")
_NAME_RE = re.compile(r"^omni_([A-Za-z0-9.-]{1,64})_(\d{1,10})_(\d{1,20})_([0-9a-f]{8})$")

#: dtypes that may travel through shared memory, by their wire name.
DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "uint16": torch.uint16,
    "int32": torch.int32,
    "uint32": torch.uint32,
    "int64": torch.int64,
    "uint64": torch.uint64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ShmHandleError(ValueError):
    """A handle that does not describe a valid live segment (forged, corrupt, or already released)."""


class TensorMeta(msgspec.Struct, frozen=True, array_like=True):
    """Where one tensor lies inside a segment."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class ShmHandle(msgspec.Struct, frozen=True):
    """What the consumer needs to map a segment. Small; send it over any msgspec channel."""

    name: str
    owner_pid: int
    total_bytes: int
    tensors: tuple[TensorMeta, ...]
    is_dict: bool = False


# --------------------------------------------------------------------------- names


def instance_id() -> str:
    """This runtime instance's id (env ``OMNI_RUNTIME_INSTANCE``; derived from the pid and exported if unset)."""
    inst = os.environ.get(INSTANCE_ENV)
    if inst is None:
        inst = f"p{os.getpid()}"
        os.environ[INSTANCE_ENV] = inst
    if not _INSTANCE_RE.match(inst):
        raise ValueError(
            f"{INSTANCE_ENV}={inst!r} is not allowed: use 1-64 characters from [A-Za-z0-9.-]"
        )
    return inst


def instance_prefix(instance: str | None = None) -> str:
    """Name prefix of every segment of a runtime instance (default: this one), e.g. ``omni_p1234_``."""
    inst = instance_id() if instance is None else instance
    if not _INSTANCE_RE.match(inst):
        raise ValueError(f"instance={inst!r} is not allowed: use 1-64 characters from [A-Za-z0-9.-]")
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


def _view(buf: mmap.mmap, meta: TensorMeta) -> torch.Tensor:
    dtype = DTYPES[meta.dtype]
    if meta.nbytes == 0:
        return torch.empty(meta.shape, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=torch.uint8, count=meta.nbytes, offset=meta.offset)
    return flat.view(dtype).view(meta.shape)


def put(obj: torch.Tensor | Mapping[str, torch.Tensor]) -> ShmHandle:
    """Copy a tensor (or a dict of tensors) into a new shared-memory segment this process owns.

    Tensors may be on any device and non-contiguous; they are stored contiguous,
    each at a 64-byte aligned offset. Returns the handle to pass to :func:`get`.
    """
    items, is_dict = _as_items(obj)
    metas: list[TensorMeta] = []
    offset = 0
    for key, t in items:
        name = _DTYPE_NAMES.get(t.dtype)
        if name is None:
            raise TypeError(
                f"put: tensor {key!r} has dtype {t.dtype}; allowed dtypes are {sorted(DTYPES)}"
            )
        nbytes = t.numel() * t.element_size()
        metas.append(TensorMeta(key, name, tuple(t.shape), offset, nbytes))
        offset = _align(offset + nbytes)
    size = max(offset, ALIGNMENT)  # mmap cannot map zero bytes

    seg, fd = _create_segment(size)
    try:
        buf = _mmap(fd, size)
    except BaseException:
        os.close(fd)
        _unlink(seg)
        raise
    os.close(fd)
    try:
        for meta, (_, t) in zip(metas, items, strict=True):
            if meta.nbytes:
                _view(buf, meta).copy_(t)
    except BaseException:
        _unlink(seg)
        raise
    # `buf` is dropped here; tensors that viewed it are gone, so the mapping is released.
    _owned.add(seg)
    return ShmHandle(seg, os.getpid(), size, tuple(metas), is_dict)


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
    if not isinstance(handle.total_bytes, int) or handle.total_bytes <= 0:
        raise ShmHandleError(f"handle.total_bytes={handle.total_bytes!r} must be a positive int")
    if len(handle.tensors) > _MAX_TENSORS:
        raise ShmHandleError(f"handle has {len(handle.tensors)} tensors; at most {_MAX_TENSORS} are allowed")
    if not handle.is_dict and len(handle.tensors) != 1:
        raise ShmHandleError(f"a single-tensor handle must describe 1 tensor, not {len(handle.tensors)}")
    keys = set()
    for meta in handle.tensors:
        if not isinstance(meta, TensorMeta) or not all(
            isinstance(x, int) for x in (meta.offset, meta.nbytes)
        ) or not isinstance(meta.key, str) or not isinstance(meta.dtype, str):
            raise ShmHandleError(f"handle.tensors holds a malformed entry: {meta!r}")
        if meta.dtype not in DTYPES:
            raise ShmHandleError(f"tensor {meta.key!r}: dtype={meta.dtype!r} is not one of {sorted(DTYPES)}")
        if len(meta.shape) > _MAX_DIMS or any(not isinstance(d, int) or d < 0 for d in meta.shape):
            raise ShmHandleError(
                f"tensor {meta.key!r}: shape={meta.shape!r} must be at most {_MAX_DIMS} non-negative ints"
            )
        itemsize = DTYPES[meta.dtype].itemsize
        expected = math.prod(meta.shape) * itemsize
        if meta.nbytes != expected:
            raise ShmHandleError(
                f"tensor {meta.key!r}: nbytes={meta.nbytes} but shape {meta.shape} of {meta.dtype} needs {expected}"
            )
        if meta.offset < 0 or meta.offset % ALIGNMENT or meta.offset + meta.nbytes > handle.total_bytes:
            raise ShmHandleError(
                f"tensor {meta.key!r}: offset={meta.offset} nbytes={meta.nbytes} must be {ALIGNMENT}-aligned "
                f"and lie inside the segment of {handle.total_bytes} bytes"
            )
        if meta.key in keys:
            raise ShmHandleError(f"tensor key {meta.key!r} appears twice in the handle")
        keys.add(meta.key)


def get(handle: ShmHandle) -> torch.Tensor | dict[str, torch.Tensor]:
    """Map the segment of ``handle`` and return zero-copy views of its tensors.

    Returns a tensor for a handle made from a tensor and a dict for one made
    from a dict. The views are writable and stay valid after the segment is
    released (the mapping lives as long as the tensors). Raises
    :class:`ShmHandleError` for a forged or stale handle.
    """
    _check_handle(handle)
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
        buf = _mmap(fd, handle.total_bytes)
    finally:
        os.close(fd)
    # Each view holds a buffer export of `buf`, which keeps the mapping alive as long as any view lives.
    views = {meta.key: _view(buf, meta) for meta in handle.tensors}
    del buf
    if handle.is_dict:
        return views
    return views[handle.tensors[0].key]


def release(handle: ShmHandle) -> bool:
    """Unlink the segment of ``handle``. Harmless if already unlinked; returns whether this call unlinked it.

    Tensors already returned by :func:`get` stay valid.
    """
    if not isinstance(handle, ShmHandle) or _NAME_RE.match(str(handle.name)) is None:
        raise ShmHandleError(f"release: not a valid ShmHandle: {handle!r}")
    done = _unlink(handle.name)
    if handle.owner_pid == os.getpid():
        with _owned.lock:
            _owned.names.discard(handle.name)
    return done


# --------------------------------------------------------------------------- sweeping


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as dead: it will never unlink anything again)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        state = data[data.rindex(b")") + 2 : data.rindex(b")") + 3]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                alive[pid] = _pid_alive(pid)
            if alive[pid]:
                continue
        if _unlink(name):
            removed.append(name)
    if removed:
        logger.info("swept %d shm segment(s) under %r", len(removed), prefix)
    return removed
