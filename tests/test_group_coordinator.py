"""GroupCoordinator collectives with exact expected values, in a world of 4 with subgroups."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from spawn import parallel_state, run_workers

from omni_runtime.parallel import state
from omni_runtime.parallel.group_coordinator import GroupCoordinator


def _x(rank: int) -> torch.Tensor:
    """A per-rank 2x4 tensor whose every entry says which rank made it."""
    return torch.arange(8, dtype=torch.float32).reshape(2, 4) + 100 * rank


def _collectives_worker(rank: int, world_size: int) -> dict:
    out: dict = {}
    with parallel_state(ulysses_degree=2):  # ulysses [[0,1],[2,3]], dp [[0,2],[1,3]]
        for name, group in (("world", state.get_world_group()), ("ulysses", state.get_ulysses_group()),
                            ("dp", state.get_dp_group())):
            r = {}
            x = _x(rank)
            before = x.clone()
            r["all_reduce"] = group.all_reduce(x).tolist()
            r["all_reduce_keeps_input"] = torch.equal(x, before)
            r["all_gather"] = {d: group.all_gather(x, dim=d).tolist() for d in (0, 1, -1, -2)}
            r["all_gather_3d_dim1"] = group.all_gather(x.reshape(2, 2, 2), dim=1).tolist()
            big = torch.arange(16, dtype=torch.float32).reshape(4, 4) * (rank + 1)
            r["reduce_scatter"] = {d: group.reduce_scatter(big, dim=d).tolist() for d in (0, 1, -1)}
            g = group.gather(x, dst=1, dim=0)
            r["gather"] = None if g is None else g.tolist()
            b = _x(rank)
            r["broadcast"] = group.broadcast(b, src=1).tolist()
            r["broadcast_in_place"] = b.tolist() == r["broadcast"]
            obj = {"from": rank, "list": [1, "two", 3.5], "t": torch.full((3,), float(rank))}
            got = group.broadcast_object(obj if group.rank_in_group == 1 else None, src=1)
            r["broadcast_object"] = {"from": got["from"], "list": got["list"], "t": got["t"].tolist()}
            objs = [None, None, None] if group.rank_in_group != 0 else [rank, {"k": "v"}, [rank, rank]]
            r["broadcast_object_list"] = group.broadcast_object_list(objs, src=0)
            out[name] = r
    return out


@pytest.mark.distributed
def test_collectives_exact_values_world4_and_subgroups():
    results = run_workers(_collectives_worker, 4, timeout=90)
    groups = {"world": [[0, 1, 2, 3]], "ulysses": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]]}
    for rank, res in enumerate(results):
        for name, all_groups in groups.items():
            members = next(g for g in all_groups if rank in g)
            me = members.index(rank)
            r = res[name]
            xs = [_x(m) for m in members]
            assert r["all_reduce"] == sum(xs).tolist(), (name, rank)
            assert r["all_reduce_keeps_input"]
            for d, got in r["all_gather"].items():
                assert got == torch.cat(xs, dim=int(d)).tolist(), (name, rank, d)
            assert r["all_gather_3d_dim1"] == torch.cat([x.reshape(2, 2, 2) for x in xs], dim=1).tolist()
            total = sum(torch.arange(16, dtype=torch.float32).reshape(4, 4) * (m + 1) for m in members)
            for d, got in r["reduce_scatter"].items():
                assert got == total.chunk(len(members), dim=int(d))[me].tolist(), (name, rank, d)
            if me == 1:
                assert r["gather"] == torch.cat(xs, dim=0).tolist()
            else:
                assert r["gather"] is None
            assert r["broadcast"] == _x(members[1]).tolist() and r["broadcast_in_place"]
            assert r["broadcast_object"] == {"from": members[1], "list": [1, "two", 3.5],
                                             "t": [float(members[1])] * 3}
            m0 = members[0]
            assert r["broadcast_object_list"] == [m0, {"k": "v"}, [m0, m0]]


def _mixed_dict(rank: int) -> dict:
    return {
        "x": torch.arange(12, dtype=torch.float32).reshape(3, 4) + rank,
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),  # non-contiguous
        "bf": torch.linspace(-2, 2, 5, dtype=torch.bfloat16),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 7),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "n": 42,
        "s": "prompt",
        "none": None,
        "nested": {"a": [1, 2], "b": 1.5},
        7: "int key",
    }


def _describe(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            out[str(k)] = ["tensor", str(v.dtype), list(v.shape), v.float().tolist()]
        else:
            out[str(k)] = ["value", v]
    return out


def _dict_worker(rank: int, world_size: int, workdir: str) -> dict:
    out: dict = {}
    with parallel_state(ulysses_degree=2):
        world = state.get_world_group()
        got = world.broadcast_tensor_dict(_mixed_dict(rank) if rank == 2 else None, src=2)
        out["bcast_world"] = _describe(got)
        ul = state.get_ulysses_group()  # [0,1] / [2,3]
        got = ul.broadcast_tensor_dict(_mixed_dict(rank) if ul.rank_in_group == 0 else None, src=0)
        out["bcast_ulysses"] = _describe(got)

        # point to point inside the dp group [0,2] / [1,3]: rank 0 of the group sends first
        dp = state.get_dp_group()
        if dp.rank_in_group == 0:
            dp.send_tensor_dict(_mixed_dict(rank), dst=1)
            out["recv_dict"] = _describe(dp.recv_tensor_dict(src=1))
            dp.send_object({"hello": rank, "t": torch.ones(2) * rank}, dst=1)
            dp.send(torch.arange(6, dtype=torch.int32).reshape(2, 3) * (rank + 1))
        else:
            out["recv_dict"] = _describe(dp.recv_tensor_dict())  # default src: previous rank
            dp.send_tensor_dict(_mixed_dict(rank))  # default dst: next rank
            o = dp.recv_object(src=0)
            out["recv_object"] = {"hello": o["hello"], "t": o["t"].tolist()}
            out["recv_tensor"] = dp.recv(torch.Size([2, 3]), torch.int32, src=0).tolist()
        try:  # refused before any communication: it would wait forever
            dp.recv_tensor_dict(src=dp.rank_in_group)
        except ValueError as e:
            out["recv_self"] = str(e)

        # all_gather_group: ranks 0 and 1 (a ulysses group) hold the same dict; each sends half of every tensor
        # whose size 2 divides to its dp peer (2, 3), which all-gather the halves over their ulysses group
        comm = dp.device_communicator
        if dp.rank_in_group == 0:
            sent = []
            for group in (None, ul):
                comm.stats.reset()
                dp.send_tensor_dict(_mixed_dict(0), dst=1, all_gather_group=group)
                sent.append(comm.stats.bytes_by_kind["send"])
            out["ag_saved"] = sent[0] - sent[1]
        else:
            dp.recv_tensor_dict(src=0)
            out["ag_dict"] = _describe(dp.recv_tensor_dict(src=0, all_gather_group=ul))

        # barrier: nobody passes before everyone has written its marker
        if rank == 3:
            time.sleep(0.3)
        open(os.path.join(workdir, f"marker{rank}"), "w").close()
        world.barrier()
        out["markers_after_barrier"] = sorted(f for f in os.listdir(workdir) if f.startswith("marker"))
        out["same_node"] = state.in_the_same_node_as(world.cpu_group, source_rank=0)
    return out


@pytest.mark.distributed
def test_tensor_dicts_objects_and_barrier(tmp_path):
    results = run_workers(_dict_worker, 4, args=(str(tmp_path),), timeout=90)
    for rank, r in enumerate(results):
        assert r["bcast_world"] == _describe(_mixed_dict(2))
        assert r["bcast_ulysses"] == _describe(_mixed_dict(0 if rank < 2 else 2))
        peer = {0: 2, 2: 0, 1: 3, 3: 1}[rank]
        assert r["recv_dict"] == _describe(_mixed_dict(peer))
        if rank in (2, 3):
            assert r["recv_object"] == {"hello": peer, "t": [float(peer)] * 2}
            assert r["recv_tensor"] == (torch.arange(6).reshape(2, 3) * (peer + 1)).tolist()
        assert r["recv_self"] == (f"receive: src {rank // 2} is this rank of group dp; a rank cannot receive "
                                  "from itself")
        assert r["markers_after_barrier"] == [f"marker{i}" for i in range(4)]
        if rank in (2, 3):
            assert r["ag_dict"] == _describe(_mixed_dict(0))
        else:  # x (12 x 4 B) and ids (6 x 8 B) travel as halves; bf (5), flag (3), scalar (1) whole: 2 does not
            # divide their element counts; the metadata is the same
            assert r["ag_saved"] == (48 + 48) // 2
        assert r["same_node"] == [True] * 4


def _same_node_worker(rank: int, world_size: int, port: int) -> list:
    from omni_runtime.comm.stateless_pg import StatelessProcessGroup
    from omni_runtime.parallel import group_coordinator

    stateless = StatelessProcessGroup.create("127.0.0.1", port, rank, world_size)
    out = [state.in_the_same_node_as(stateless, source_rank=1),
           state.in_the_same_node_as(dist.group.WORLD, source_rank=0)]
    # pretend ranks 0 and 1 live on one node and rank 2 on another
    group_coordinator.node_id = lambda: "node-a" if rank < 2 else "node-b"
    for pg in (stateless, dist.group.WORLD):
        out.append([state.in_the_same_node_as(pg, source_rank=1), state.in_the_same_node_as(pg, source_rank=2)])
    return out


@pytest.mark.distributed
def test_in_the_same_node_as_torch_and_stateless_groups():
    from omni_runtime.runtime.launcher import free_port

    results = run_workers(_same_node_worker, 3, args=(free_port(),), timeout=60, init_process_group=True)
    split = [[True, True, False], [False, False, True]]
    assert results == [[[True] * 3, [True] * 3, split, split]] * 3


def test_single_process_group_is_identity():
    assert not dist.is_initialized()
    g = GroupCoordinator([[0]], 0, "gloo", group_name="solo")
    assert (g.ranks, g.rank, g.rank_in_group, g.world_size) == ([0], 0, 0, 1)
    x = torch.arange(6.0).reshape(2, 3)
    assert g.all_reduce(x) is x and g.all_gather(x, 0) is x and g.reduce_scatter(x, 1) is x
    assert g.gather(x, 0, 1) is x and g.broadcast(x, 0) is x
    d = {"x": x, "n": 1}
    assert g.broadcast_tensor_dict(d) is d
    assert g.broadcast_object_list([1, 2]) == [1, 2]
    g.barrier()
    with pytest.raises(ValueError, match="group solo has a single rank"):
        g.send(x)
    with pytest.raises(ValueError, match="src=1 is not a rank of group solo"):
        g.broadcast(x, src=1)
    with pytest.raises(RuntimeError, match="init_distributed_environment"):
        GroupCoordinator([[0, 1]], 0, "gloo")
