"""StatelessProcessGroup with 4 real ranks: every call, barrier timeout, expiry, and a
stateless gloo ProcessGroup that never creates the default group."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from spawn import run_workers

from omni_runtime.comm.stateless_pg import (
    StatelessProcessGroup,
    stateless_destroy_torch_distributed_process_group,
    stateless_init_torch_distributed_process_group,
)
from omni_runtime.runtime.launcher import free_port

pytestmark = pytest.mark.distributed

WORLD = 4


def _group(rank, world_size, **kw) -> StatelessProcessGroup:
    return StatelessProcessGroup.create("127.0.0.1", int(os.environ["MASTER_PORT"]), rank, world_size,
                                        store_timeout=60, **kw)


def _every_call(rank, world_size):
    pg = _group(rank, world_size)
    out = {}
    # point to point: every rank sends two messages to every other rank; order per pair is kept
    for dst in range(world_size):
        if dst != rank:
            pg.send_obj({"from": rank, "to": dst, "n": 0}, dst)
            pg.send_obj([rank, dst, 1, b"\x00\xff"], dst)
    got = {}
    for src in range(world_size):
        if src != rank:
            first, second = pg.recv_obj(src), pg.recv_obj(src)
            got[src] = [first, [second[0], second[1], second[2], second[3].hex()]]
    out["p2p"] = got
    # broadcast from a non-zero source, twice, plus a tensor inside
    out["bcast"] = [
        pg.broadcast_obj({"step": 7, "src": 2} if rank == 2 else None, src=2),
        pg.broadcast_obj("second" if rank == 2 else None, src=2),
    ]
    t = pg.broadcast_obj(torch.arange(6, dtype=torch.bfloat16).reshape(2, 3) if rank == 3 else None, src=3)
    out["bcast_tensor"] = [str(t.dtype), t.float().tolist()]
    out["gather"] = pg.all_gather_obj({"rank": rank, "sq": rank * rank})
    # barrier: nobody leaves before the slowest rank arrives
    time.sleep(0.3 * rank)
    out["arrived_at"] = time.time()
    pg.barrier(timeout=30)
    out["left_at"] = time.time()
    pg.barrier(timeout=30)  # a second barrier right after the first must not confuse them
    out["gather_after"] = pg.all_gather_obj(rank * 10)
    pg.barrier(timeout=30)
    if rank == 0:
        out["barrier_keys_left"] = sum(
            pg.store.check([f"barrier/{b}/{p}/{r}"]) for b in range(3) for p in ("arrive", "confirm", "depart")
            for r in range(world_size))
        out["p2p_keys_left"] = sum(pg.store.check([f"p2p/{s}->{d}/{n}"]) for s in range(world_size)
                                   for d in range(world_size) for n in range(2))
    return out


def test_every_call_with_four_ranks():
    outs = run_workers(_every_call, WORLD, timeout=120)
    for rank, out in enumerate(outs):
        expected_p2p = {str(src): [{"from": src, "to": rank, "n": 0}, [src, rank, 1, "00ff"]]
                        for src in range(WORLD) if src != rank}
        assert out["p2p"] == expected_p2p
        assert out["bcast"] == [{"step": 7, "src": 2}, "second"]
        assert out["bcast_tensor"] == ["torch.bfloat16", [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]]
        assert out["gather"] == [{"rank": r, "sq": r * r} for r in range(WORLD)]
        assert out["gather_after"] == [0, 10, 20, 30]
    # ranks arrived 0.3 s apart; nobody left before the last one arrived
    assert max(o["arrived_at"] for o in outs) - min(o["arrived_at"] for o in outs) >= 0.8
    assert min(o["left_at"] for o in outs) >= max(o["arrived_at"] for o in outs)
    assert outs[0]["barrier_keys_left"] == 0
    assert outs[0]["p2p_keys_left"] == 0


def _barrier_missing_rank(rank, world_size):
    pg = _group(rank, world_size)
    if rank == 3:
        return {"rank": rank}  # never arrives at the barrier
    t0 = time.monotonic()
    try:
        pg.barrier(timeout=2.0)
    except RuntimeError as e:
        elapsed = time.monotonic() - t0
        if rank == 0:
            time.sleep(2.0)  # rank 0 hosts the store: outlive the others' timeouts so they see theirs
        return {"error": str(e), "elapsed": elapsed}
    return {"error": None}


def test_barrier_timeout_names_the_missing_rank():
    outs = run_workers(_barrier_missing_rank, WORLD, timeout=60)
    for out in outs[:3]:
        assert out["error"] is not None and "rank(s) [3]" in out["error"] and "arrive" in out["error"]
        assert 2.0 <= out["elapsed"] < 4.0


def _expiry(rank, world_size):
    """Expiry against the group's clock moved forward by hand (no sleeps, so no race with a loaded machine): the
    expiry time is a minute, far beyond any stall between two lines here, and rank 0 jumps past it."""
    import types

    import omni_runtime.comm.stateless_pg as spg

    ahead = [0.0]  # seconds rank 0's group clock runs ahead of the real one
    spg.time = types.SimpleNamespace(monotonic=lambda: time.monotonic() + ahead[0], sleep=time.sleep)
    pg = _group(rank, world_size, data_expiration_seconds=60)
    got = pg.broadcast_obj({"v": 1} if rank == 0 else None, src=0)
    pg.barrier()
    out = {"got": got}
    if rank == 0:
        out["present_before"] = pg.store.check(["bcast/0/0"])
        out["expired_early"] = pg.expire_data()
        ahead[0] += 61
        out["expired"] = pg.expire_data()
        out["present_after"] = pg.store.check(["bcast/0/0"])
        pg.broadcast_obj("fresh", src=0)
        pg.barrier()  # every rank has read it
        ahead[0] += 61
        pg.send_obj("trigger", dst=1)  # every send expires what is old
        out["fresh_present_after_send"] = pg.store.check(["bcast/0/1"])
    else:
        out["second"] = pg.broadcast_obj(None, src=0)
        pg.barrier()
        if rank == 1:
            out["trigger"] = pg.recv_obj(0)
    pg.barrier()
    return out


def test_old_data_expires():
    outs = run_workers(_expiry, WORLD, timeout=60)
    assert all(o["got"] == {"v": 1} for o in outs)
    r0 = outs[0]
    assert r0["present_before"] is True and r0["expired_early"] == 0
    assert r0["expired"] == 1 and r0["present_after"] is False
    assert r0["fresh_present_after_send"] is False
    assert [o.get("second") for o in outs[1:]] == ["fresh"] * 3
    assert outs[1]["trigger"] == "trigger"


def _stateless_gloo(rank, world_size):
    meta = _group(rank, world_size)
    port = meta.broadcast_obj(free_port() if rank == 0 else None, src=0)
    pg = stateless_init_torch_distributed_process_group("127.0.0.1", port, rank, world_size, "gloo")
    t = torch.tensor([float(rank + 1), 10.0 * rank])
    pg.allreduce([t]).wait()
    t2 = torch.full((3,), float(rank))
    dist.all_reduce(t2, op=dist.ReduceOp.MAX, group=pg)
    gathered = [torch.zeros(1) for _ in range(world_size)]
    pg.allgather([gathered], [torch.tensor([rank * 2.0])]).wait()
    out = {"sum": t.tolist(), "max": t2.tolist(), "gathered": [g.item() for g in gathered],
           "pg_rank": pg.rank(), "pg_size": pg.size(), "initialized": dist.is_initialized()}
    meta.barrier()
    stateless_destroy_torch_distributed_process_group(pg)
    return out


def test_stateless_gloo_group_all_reduce_without_default_group():
    outs = run_workers(_stateless_gloo, WORLD, timeout=90)
    for rank, out in enumerate(outs):
        assert out["sum"] == [10.0, 60.0]
        assert out["max"] == [3.0, 3.0, 3.0]
        assert out["gathered"] == [0.0, 2.0, 4.0, 6.0]
        assert (out["pg_rank"], out["pg_size"]) == (rank, WORLD)
        assert out["initialized"] is False


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"rank=4 must be an int in \[0, 3\]"):
        StatelessProcessGroup.create("127.0.0.1", 1, 4, 4)
    with pytest.raises(ValueError, match="backend='mpi'"):
        stateless_init_torch_distributed_process_group("127.0.0.1", 1, 0, 1, "mpi")
