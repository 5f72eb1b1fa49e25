"""How a rank process is set up for compute (issue 16), checked by counts and settings, never by time:

- it keeps freed activation memory (runtime.allocator): a step that allocates and frees the same blocks as the
  previous one takes no new page faults, where glibc's defaults trim the heap and fault it in again;
- its OpenMP settings come from the node's core budget (runtime.cores.omp_env, given to the forkserver): threads
  that sleep when idle for stages that compute at once on oversubscribed cores, libgomp's spinning when they take
  turns, what the user set in any case; the frontend's own environment is left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

STEPS = """
import os, resource, sys
import numpy as np

def steps():  # ten steps of 8 x 4 MiB live at once, every page written, then all freed; prints their faults
    def step():
        blocks = [np.ones(1 << 20, np.float32) for _ in range(8)]
        del blocks
    step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(os.environ.get("OMNI_PROBE_ENV", "-"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""
PAGES = 10 * 8 * (4 << 20) // 4096  # pages the ten steps write

# the allocator call alone ("keep") or glibc's defaults
PROBE = STEPS + """
from omni_runtime.runtime import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
steps()
"""
# the rank entry point, its worker replaced by the steps: what the rank's set-up left behind
RANK_PROBE = STEPS + """
from omni_runtime.runtime import launcher
launcher.worker_main = lambda spec_bytes: steps()
launcher._rank_main(b"", {"OMNI_PROBE_ENV": "set"}, os.getppid())
"""


def _probe(code: str, *args: str) -> tuple[str, int]:
    """(OMNI_PROBE_ENV as the steps saw it, their page faults)."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                         check=True)
    env, faults = out.stdout.split()[-2:]
    return env, int(faults)


def test_kept_memory_is_not_faulted_in_again_each_step():
    default, kept = _probe(PROBE, "default")[1], _probe(PROBE, "keep")[1]
    assert default > PAGES // 4, (default, PAGES)  # glibc's defaults: the freed heap top is trimmed every step
    assert kept < PAGES // 100, (kept, PAGES)


def test_every_rank_process_applies_it():
    """The rank entry point itself, in a fresh process with the worker replaced: the placement's environment is
    set and the steps fault in no pages again (without ``keep_freed_memory`` they would, the test above)."""
    env, faults = _probe(RANK_PROBE)
    assert env == "set"
    assert faults < PAGES // 100, (faults, PAGES)


OMP_PROBE = """
import os, sys
from omni_runtime.runtime import cores, launcher, rank_forkserver

def setting():
    return os.environ.get("OMP_WAIT_POLICY", os.environ.get("GOMP_SPINCOUNT", "-"))

def report(q):
    q.put(setting())

if __name__ == "__main__":
    launcher._CTX.set_forkserver_preload([])  # the setting, not torch, is under test
    rank_forkserver.start_forkserver(cores.omp_env(sys.argv[1], oversubscribed=True))
    q = launcher._CTX.Queue()
    p = launcher._CTX.Process(target=report, args=(q,))
    p.start()
    print(q.get(timeout=120), setting())
    p.join(30)
"""


def _omp_policy(tmp_path, env: dict[str, str], sharing: str = "concurrent") -> list[str]:
    script = tmp_path / "omp_probe.py"
    script.write_text(OMP_PROBE)
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, str(script), sharing], capture_output=True, text=True, timeout=300,
                         check=True, env={**base, **env})
    return out.stdout.split()


@pytest.mark.parametrize(("sharing", "rank"), [("concurrent", "PASSIVE"), ("exclusive", "-")])
def test_ranks_get_the_budgets_omp_wait_policy_and_the_frontend_keeps_its_environment(tmp_path, sharing, rank):
    # the rank (a forkserver child) has it from the forkserver's start; the frontend's environment is unchanged
    assert _omp_policy(tmp_path, {}, sharing) == [rank, "-"]


def test_a_wait_policy_the_user_set_wins(tmp_path):
    assert _omp_policy(tmp_path, {"OMP_WAIT_POLICY": "ACTIVE"}) == ["ACTIVE", "ACTIVE"]
    assert _omp_policy(tmp_path, {"GOMP_SPINCOUNT": "1000"}, "exclusive") == ["1000", "1000"]
