"""HSDP ranks hand the all-gathered weights' pages back to the OS after each forward (``malloc_trim``).

FSDP2 all-gathers a unit's weights before its forward and frees them after it, one tensor per parameter. On CPU
those tensors come from glibc's heap (a rank process keeps blocks up to 32 MiB there, ``runtime.allocator``), and a
freed block stays mapped: the pages of every unit's full weights, plus the activations between them, stay resident
after the step, so a sharded rank ended a request holding more than an unsharded one (docs/BENCHMARKS.md, "HSDP
memory in steady state"). ``malloc_trim(0)`` after the model's forward returns every free page of every arena
(glibc >= 2.8 also releases whole free pages inside the heap, not only its top), so between steps a rank holds its
shards, the unsharded root parameters FSDP keeps none of, and the live tensors. The price is that the next step
faults the released pages in again (measured in the same benchmark). Not glibc (macOS, musl): nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from functools import lru_cache
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_freed_memory() -> bool:
    """Return the process's free heap pages to the OS; True when glibc released something."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


def release_after_forward(model: nn.Module) -> None:
    """After every forward of ``model`` (an HSDP root with CPU weights, its units resharded by then), release the
    freed pages of the heap. (Weights on a GPU are not in that heap: the caller hooks CPU models only.)"""

    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        release_freed_memory()

    model.register_forward_hook(hook, with_kwargs=True, always_call=True)
