"""A rank process keeps freed activation memory (runtime.allocator): a step that allocates and frees the same
blocks as the previous one takes no new page faults, where glibc's defaults trim the heap and fault it in again.
Counted in page faults (getrusage), not time."""

from __future__ import annotations

import subprocess
import sys

from omni_runtime.runtime.launcher import _rank_main

PROBE = """
import resource, sys
import numpy as np
from omni_runtime.runtime import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
def step():  # 8 x 4 MiB live at once, every page written, then all freed: one step's activations
    blocks = [np.ones(1 << 20, np.float32) for _ in range(8)]
    del blocks
step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""
PAGES = 10 * 8 * (4 << 20) // 4096  # pages the ten steps write


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                         check=True)
    return int(out.stdout.split()[-1])


def test_kept_memory_is_not_faulted_in_again_each_step():
    default, kept = _faults("default"), _faults("keep")
    assert default > PAGES // 4, (default, PAGES)  # glibc's defaults: the freed heap top is trimmed every step
    assert kept < PAGES // 100, (kept, PAGES)


def test_every_rank_process_applies_it():
    import inspect

    assert "allocator.keep_freed_memory()" in inspect.getsource(_rank_main)
