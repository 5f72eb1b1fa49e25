"""A runtime instance: its id, its private run directory, whether it is alive, and the sweep of dead ones.

Every process of one runtime (the frontend and all its ranks) shares an instance id (env
``OMNI_RUNTIME_INSTANCE``). The instance's run directory ``$TMPDIR/omni-rt-<instance>`` (mode 0700, ours) holds
its ipc sockets, rendezvous files and an ``owner`` record: the pid, start time and boot id of the process that
created it. Shared-memory segments of the instance are named ``omni_<instance>_<pid>_...`` (comm.shm_tensor).

An instance is dead when its owner is (a reused pid has another start time; a reboot another boot id);
:mod:`comm.cleanup` removes what dead instances left.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
from pathlib import Path

from omni_runtime.comm.node import boot_id
from omni_runtime.comm.processes import pid_alive, start_time

logger = logging.getLogger(__name__)

__all__ = [
    "INSTANCE_ENV", "RUN_DIR_PREFIX", "check_instance", "instance_id", "owner_alive", "run_dir", "run_dir_path",
    "valid_instance",
]

INSTANCE_ENV = "OMNI_RUNTIME_INSTANCE"
RUN_DIR_PREFIX = "omni-rt-"
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9.-]{1,64}$")


def check_instance(inst: str) -> str:
    if not isinstance(inst, str) or not _INSTANCE_RE.match(inst):
        raise ValueError(f"instance={inst!r} is not allowed: use 1-64 characters from [A-Za-z0-9.-]")
    return inst


def instance_id() -> str:
    """This runtime instance's id (env ``OMNI_RUNTIME_INSTANCE``; derived from the pid and exported if unset)."""
    inst = os.environ.get(INSTANCE_ENV)
    if inst is None:
        inst = f"p{os.getpid()}"
        os.environ[INSTANCE_ENV] = inst
    if not _INSTANCE_RE.match(inst):
        raise ValueError(f"{INSTANCE_ENV}={inst!r} is not allowed: use 1-64 characters from [A-Za-z0-9.-]")
    return inst


def run_dir_path(instance: str | None = None) -> Path:
    """Where the run directory of ``instance`` (default: this one) lives; does not create it."""
    inst = instance_id() if instance is None else check_instance(instance)
    return Path(tempfile.gettempdir()) / f"{RUN_DIR_PREFIX}{inst}"


def run_dir(instance: str | None = None) -> Path:
    """The run directory of ``instance`` (default: this one), created mode 0700 if missing.

    The first process that creates it becomes its owner (an ``owner`` record). Raises ``PermissionError``
    when the path exists but is not a directory of ours with mode 0700 (another user could reach the
    sockets in it)."""
    path = run_dir_path(instance)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"run directory {path} is not a directory of uid {os.getuid()} with mode 0700 "
                              f"(mode {oct(stat.S_IMODE(st.st_mode))}, uid {st.st_uid}); remove it")
    owner = path / "owner"
    if not owner.exists():
        pid = os.getpid()
        tmp = path / f".owner.{pid}"
        tmp.write_text(f"{pid} {start_time(pid)} {boot_id()}\n")
        try:
            os.link(tmp, owner)  # atomic, and never replaces a record another process wrote first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path


def owner_alive(path: Path) -> bool | None:
    """Whether the owner of run directory ``path`` still runs; None when it has no readable record."""
    try:
        pid_s, start_s, boot = (path / "owner").read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    if boot != boot_id() or not pid_alive(pid):
        return False
    return start_s == "None" or str(start_time(pid)) == start_s


def valid_instance(inst: str) -> bool:
    return isinstance(inst, str) and _INSTANCE_RE.match(inst) is not None
