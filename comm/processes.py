"""Process liveness and the one process-tree kill (used by the launcher and by tests/spawn.py).

:func:`kill_tree` SIGKILLs processes and everything they started, then reaps them; :func:`pid_alive` treats a
zombie as dead (it will never unlink anything again); :func:`start_time` tells a pid from a reused one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import psutil

logger = logging.getLogger(__name__)

__all__ = ["kill_tree", "pid_alive", "start_time"]


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs on this node (a zombie counts as dead: it will never unlink anything again)."""
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


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def kill_tree(pids: Iterable[int | None], timeout: float = 5.0) -> list[int]:
    """SIGKILL every process in ``pids`` and all their descendants, and wait up to ``timeout`` s for them.

    Descendants are collected before anything is killed (a killed parent's children would be re-parented
    and lost). ``None`` entries (a process never started) are skipped. Returns the pids still alive after
    the wait (normally none). The caller still ``join()``s its own ``multiprocessing`` children.
    """
    victims: dict[int, psutil.Process] = {}
    for pid in pids:
        if pid is None:
            continue
        try:
            ps = psutil.Process(pid)
            for v in [*ps.children(recursive=True), ps]:
                victims[v.pid] = v
        except psutil.NoSuchProcess:
            pass
    for v in victims.values():
        try:
            v.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=timeout)
    if alive:
        logger.warning("processes still alive %.1fs after SIGKILL: %s", timeout, [p.pid for p in alive])
    return [p.pid for p in alive]
