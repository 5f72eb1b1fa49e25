"""What a runtime instance leaves behind, removed: at every start (dead instances) and when a rank's parent dies.

:func:`sweep_dead` removes the run directories and shm segments of dead instances (their owner process is gone,
:func:`comm.instance.owner_alive`), and segments of any instance whose creating process is dead: every start of
the runtime calls it, so a SIGKILLed ``serve`` leaves nothing behind once the next one starts.
:func:`exit_with_parent` is the watchdog of a rank process: when the frontend dies it unlinks the rank's own
segments and exits.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

from omni_runtime.comm import instance, shm_tensor
from omni_runtime.comm.processes import pid_alive

logger = logging.getLogger(__name__)

__all__ = ["exit_with_parent", "sweep_dead"]


def sweep_dead() -> tuple[list[str], list[str]]:
    """Remove what dead instances left: run directories (and all their segments) whose owner is dead, and
    segments of any instance whose creating process is dead. Returns (segments removed, directories removed)."""
    segments: list[str] = []
    dirs: list[str] = []
    tmp = Path(tempfile.gettempdir())
    try:
        entries = list(tmp.glob(f"{instance.RUN_DIR_PREFIX}*"))
    except OSError:
        entries = []
    for path in entries:
        inst = path.name[len(instance.RUN_DIR_PREFIX):]
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or not instance.valid_instance(inst):
            continue
        if instance.owner_alive(path) is not False:
            continue
        segments += shm_tensor.sweep(shm_tensor.instance_prefix(inst), include_live=True)
        shutil.rmtree(path, ignore_errors=True)
        dirs.append(str(path))
    segments += shm_tensor.sweep("omni_")  # any instance: segments whose creating process is dead
    if segments or dirs:
        logger.info("swept %d shm segment(s) and %d run dir(s) of dead runtime instances", len(segments), len(dirs))
    return segments, dirs


def exit_with_parent(parent_pid: int, interval: float = 0.1) -> threading.Thread:
    """Start a daemon thread that, once ``parent_pid`` is gone (or a zombie), unlinks the shared-memory
    segments this process owns and exits it at once (``os._exit``; no other cleanup can be trusted then).

    A rank must never outlive the frontend that launched it, nor leave its segments behind when it goes."""

    def watch() -> None:
        while pid_alive(parent_pid):
            time.sleep(interval)
        try:
            shm_tensor.shutdown()
        finally:
            os._exit(0)

    t = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    t.start()
    return t
