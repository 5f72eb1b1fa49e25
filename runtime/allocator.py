"""The C allocator settings of a rank process: keep freed activation memory instead of handing it back each step.

glibc's ``malloc`` serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB at first, raised on the fly up to 32 MiB as
such blocks are freed) with a fresh ``mmap`` and returns them with ``munmap``, and it trims the heap top beyond
``M_TRIM_THRESHOLD``. For a long-lived stage process that computes the same shapes every step, both mean the
kernel zero-fills the same activation pages again and again: in a rank process (a forkserver child, whose
allocator state is the forkserver's) one denoiser batch took ~30-70 k minor page faults and +3-9 % CPU time
against the same call in a process whose thresholds had already risen (``tools/profile_denoiser.py``,
docs/BENCHMARKS.md, issue 16). Fixing both thresholds keeps blocks up to 32 MiB in the heap and the freed top
of the heap mapped, so a step reuses the previous step's pages.

The environment variables (``MALLOC_MMAP_THRESHOLD_``) would come too late: a forkserver child's allocator was
set up when the forkserver started. ``mallopt`` works at any time. Not glibc (macOS, musl): nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest allowed M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024  # freed heap top kept mapped: the activations of a step


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True when glibc took both (False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if not ok:
        logger.warning("mallopt refused mmap threshold %d / trim threshold %d", mmap_threshold, trim_threshold)
    return ok
