"""Imported only by the ranks' forkserver, as the last module it preloads (``runtime.rank_forkserver.PRELOAD``):
once the frontend is gone (the forkserver's pipe reaches EOF), the forkserver exits at once instead of tearing down
torch, transformers and diffusers module by module (seconds of CPU for a process that never computed anything).

Its ranks are not affected: a forkserver child ends through ``os._exit`` after its target returns, never through
``atexit``. Never import this module anywhere else: that process would skip its own clean exit too.
"""

from __future__ import annotations

import atexit
import os
import sys


def _exit_now() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(0)


atexit.register(_exit_now)  # registered last, so it runs first (atexit is LIFO)
