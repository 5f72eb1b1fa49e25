"""The spawn helper itself: results come back, failures carry the child's traceback, hangs are killed."""

import os
import time

import psutil
import pytest
import torch
import torch.distributed as dist
from spawn import WorkerFailed, run_workers

pytestmark = pytest.mark.distributed


def _all_reduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t.item(), "pid": os.getpid()}


def _raise_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank one")
    dist.barrier()  # the others block here until they are killed


def _hang(rank, world_size):
    time.sleep(3600)


def test_results_come_back_by_rank():
    out = run_workers(_all_reduce, 4, init_process_group=True, timeout=60)
    assert [o["rank"] for o in out] == [0, 1, 2, 3]
    assert all(o["sum"] == 10.0 for o in out)
    assert all(not psutil.pid_exists(o["pid"]) or psutil.Process(o["pid"]).status() == psutil.STATUS_ZOMBIE
               for o in out)


def test_child_traceback_is_reported_and_peers_killed():
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed) as ei:
        run_workers(_raise_on_rank_1, 3, init_process_group=True, timeout=60, grace=1.0)
    msg = str(ei.value)
    assert "rank 1 raised" in msg and "ValueError: boom from rank one" in msg
    assert time.monotonic() - t0 < 30


def test_timeout_kills_and_dumps_stacks():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(WorkerFailed) as ei:
        run_workers(_hang, 2, timeout=3)
    msg = str(ei.value)
    assert "timed out after 3s" in msg
    assert "_hang" in msg  # the faulthandler dump shows where it hung
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    # only the forkserver itself may remain (it is shared by all tests)
    assert all("forkserver" in " ".join(psutil.Process(p).cmdline()) for p in left)
