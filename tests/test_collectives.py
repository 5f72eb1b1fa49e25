"""Ulysses all-to-all (4D/5D, autograd) and the RingComm exchange, on real gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from spawn import parallel_state, run_workers

from omni_runtime.parallel import state
from omni_runtime.parallel.collectives import (
    RingComm,
    SeqAllToAll4D,
    SeqAllToAll5D,
    all_to_all_4D,
    all_to_all_5D,
)


def _full(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _a2a_worker(rank: int, world_size: int) -> dict:
    out: dict = {}
    with parallel_state(ulysses_degree=2):  # subgroups [0,1], [2,3]
        for name, coord in (("world", state.get_world_group()), ("ulysses", state.get_ulysses_group())):
            group, p, me = coord.device_group, coord.world_size, coord.rank_in_group
            res = {}
            # 4D: (bs, seq, heads, hd) = (2, 4p, 2p, 3); every rank knows the full tensor
            full = _full((2, 4 * p, 2 * p, 3), seed=1)
            seq_shard = full.chunk(p, dim=1)[me]
            head_shard = full.chunk(p, dim=2)[me]
            fwd = all_to_all_4D(seq_shard, scatter_idx=2, gather_idx=1, group=group)
            back = all_to_all_4D(fwd, scatter_idx=1, gather_idx=2, group=group)
            res["4d_fwd_exact"] = torch.equal(fwd, head_shard)
            res["4d_back_exact"] = torch.equal(back, seq_shard)
            res["4d_bf16_exact"] = torch.equal(
                all_to_all_4D(seq_shard.bfloat16(), 2, 1, group=group), head_shard.bfloat16())
            # 5D: (bs, seq, 3, heads, hd)
            full5 = _full((2, 2 * p, 3, 3 * p, 4), seed=2)
            seq5 = full5.chunk(p, dim=1)[me]
            head5 = full5.chunk(p, dim=3)[me]
            res["4d_via_coordinator"] = torch.equal(all_to_all_4D(seq_shard, 2, 1, group=coord), head_shard)
            fwd5 = all_to_all_5D(seq5, scatter_idx=3, gather_idx=1, group=group)
            res["5d_fwd_exact"] = torch.equal(fwd5, head5)
            res["5d_back_exact"] = torch.equal(all_to_all_5D(fwd5, scatter_idx=1, gather_idx=3, group=group), seq5)
            try:
                all_to_all_4D(torch.zeros(1, 2, 2 * p + 1, 3), 2, 1, group=group)
            except ValueError as e:
                res["indivisible"] = str(e)
            out[name] = res
        out["grads"] = _grad_checks(state.get_ulysses_group())
        out["grads_world"] = _grad_checks(state.get_world_group())
    return out


def _grad_checks(coord) -> dict:
    """Backward of the sharded computation equals autograd on the full (unsharded) tensors."""
    group, p, me = coord.device_group, coord.world_size, coord.rank_in_group
    res = {}
    # 4D: attention-like round trip. seq-sharded x -> head-sharded -> per-head nonlinearity -> back.
    x_full = _full((2, 4 * p, 2 * p, 3), seed=3, dtype=torch.float64)
    scale_full = _full((1, 1, 2 * p, 1), seed=4, dtype=torch.float64)
    w_full = _full((2, 4 * p, 2 * p, 3), seed=5, dtype=torch.float64)
    x_ref = x_full.clone().requires_grad_()
    loss_ref = ((x_ref.sin() * scale_full) * w_full).sum()
    loss_ref.backward()

    x = x_full.chunk(p, dim=1)[me].clone().requires_grad_()
    heads = SeqAllToAll4D.apply(group, x, 2, 1)
    y = heads.sin() * scale_full.chunk(p, dim=2)[me]
    back = SeqAllToAll4D.apply(group, y, 1, 2)
    (back * w_full.chunk(p, dim=1)[me]).sum().backward()
    gathered = coord.all_gather(x.grad, dim=1)
    res["4d_grad_max_err"] = float((gathered - x_ref.grad).abs().max())

    # 5D: packed qkv, gradient through one all-to-all
    q_full = _full((1, 2 * p, 3, 2 * p, 2), seed=6, dtype=torch.float64)
    w5 = _full((1, 2 * p, 3, 2 * p, 2), seed=7, dtype=torch.float64)
    q_ref = q_full.clone().requires_grad_()
    (q_ref.exp() * w5).sum().backward()
    q = q_full.chunk(p, dim=1)[me].clone().requires_grad_()
    h = SeqAllToAll5D.apply(group, q, 3, 1)
    (h.exp() * w5.chunk(p, dim=3)[me]).sum().backward()
    res["5d_grad_max_err"] = float((coord.all_gather(q.grad, dim=1) - q_ref.grad).abs().max())
    return res


@pytest.mark.distributed
def test_all_to_all_round_trips_and_backward():
    results = run_workers(_a2a_worker, 4, timeout=90)
    for rank, r in enumerate(results):
        for name, p in (("world", 4), ("ulysses", 2)):
            res = r[name]
            assert res["4d_fwd_exact"] and res["4d_back_exact"] and res["4d_bf16_exact"], (name, rank)
            assert res["4d_via_coordinator"], (name, rank)
            assert res["5d_fwd_exact"] and res["5d_back_exact"], (name, rank)
            assert res["indivisible"] == f"all-to-all: head count {2 * p + 1} is not divisible by the group size {p}"
        for key in ("grads", "grads_world"):
            assert r[key]["4d_grad_max_err"] < 1e-12, (key, rank, r[key])
            assert r[key]["5d_grad_max_err"] < 1e-12, (key, rank, r[key])


def _ring_worker(rank: int, world_size: int) -> dict:
    out: dict = {}
    with parallel_state():
        # 0) no mesh yet: the stand-in one-rank coordinator must not fall back to the world group
        x = torch.arange(24.0).reshape(1, 2, 4, 3) + rank
        out["no_mesh_identity"] = all_to_all_4D(x, 2, 1, group=state.get_ulysses_group()) is x
        # 1) a ring over the whole world of 4 (group=None and the world group's process group)
        for name, pg in (("default", None), ("world", state.get_world_group())):
            comm = RingComm(pg)
            cur = torch.tensor([float(rank), 10.0 * rank])
            seen = [cur.tolist()]
            for _ in range(world_size - 1):
                nxt = comm.send_recv(cur)
                comm.commit()
                comm.wait()
                cur = nxt
                seen.append(cur.tolist())
            out[name] = seen
        # 2) two tensors per step into a preallocated buffer, on strided ring groups [0,2] and [1,3]
        state.initialize_model_parallel(ulysses_degree=2, ring_degree=2)
        ring = state.get_ring_group()
        comm = RingComm(ring.device_group)
        k, v = torch.full((2, 3), float(rank)), torch.full((4,), -float(rank))
        k_buf = torch.empty_like(k)
        k_next = comm.send_recv(k, k_buf)
        v_next = comm.send_recv(v)
        comm.commit()
        comm.wait()
        out["strided"] = [k_next.tolist(), v_next.tolist(), k_next is k_buf,
                          comm.send_rank, comm.recv_rank]
        try:
            comm.wait()
        except RuntimeError as e:
            out["wait_twice"] = str(e)
    return out


@pytest.mark.distributed
def test_ring_comm_passes_tensors_around():
    results = run_workers(_ring_worker, 4, timeout=60)
    for rank, r in enumerate(results):
        expected = [[float((rank - s) % 4), 10.0 * ((rank - s) % 4)] for s in range(4)]
        assert r["no_mesh_identity"] is True
        assert r["default"] == expected and r["world"] == expected
        peer = {0: 2, 2: 0, 1: 3, 3: 1}[rank]  # ring of 2: previous = next = the other member
        assert r["strided"] == [[[float(peer)] * 3] * 2, [-float(peer)] * 4, True, peer, peer]
        assert r["wait_twice"] == "RingComm.wait() called before commit()"


def test_single_process_is_identity():
    assert not dist.is_initialized()
    x = torch.randn(2, 4, 6, 3)
    assert all_to_all_4D(x) is x and all_to_all_5D(x.unsqueeze(2).expand(2, 4, 3, 6, 3)).shape == (2, 4, 3, 6, 3)
    y = x.clone().requires_grad_()
    SeqAllToAll4D.apply(None, y, 2, 1).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match=r"\(scatter_idx, gather_idx\) = \(2, 1\) or \(1, 2\), got \(3, 1\)"):
        all_to_all_4D(x, 3, 1)
