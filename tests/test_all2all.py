"""The all2all managers in real gloo worlds of 2, 3 and 4 processes, against a single-process MoE reference.

Every rank generates the same global data from a seed (so each can compute the reference itself): tokens with
different counts per rank (0 included), random top-k routing that leaves some experts without tokens, and
expert weights. ``dispatch -> experts -> combine`` through the EP group's communicator must equal the
single-process expert computation on the concatenated tokens (rel <= 1e-5, fp32).
"""

from __future__ import annotations

import types

import pytest
import torch
from spawn import run_workers

from omni_runtime.parallel.all2all import (
    ALL2ALL_BACKENDS,
    CPU_CAPABLE_BACKENDS,
    All2AllBackendUnavailable,
    All2AllError,
    DeepEPHTAll2AllManager,
    DeepEPLLAll2AllManager,
    attach_all2all_manager,
    init_expert_parallel,
    local_expert_range,
)
from omni_runtime.parallel.all2all.gpu_managers import low_latency_rdma_size_hint
from omni_runtime.parallel.moe import MoEFeedForward

DIM, HIDDEN, EXPERTS, TOP_K = 8, 16, 12, 3
UNUSED_EXPERTS = (1, 6)  # no token is ever routed to these
SP_COUNTS = [5, 0, 7, 3]  # tokens per rank when every rank holds its own tokens
# is_sequence_parallel=False: the ranks of a replica group hold identical tokens
REPLICA_GROUPS = {2: [[0, 1]], 3: [[0, 2], [1]], 4: [[0, 2], [1, 3]]}
REPLICA_COUNTS = {2: [5], 3: [9, 0], 4: [7, 2]}


def _tokens(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    allowed = torch.tensor([e for e in range(EXPERTS) if e not in UNUSED_EXPERTS])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:TOP_K]] for _ in range(n)]) \
        if n else torch.empty(0, TOP_K, dtype=torch.int64)
    w = torch.rand(n, TOP_K, generator=g)
    return x, w, ids


def _token_sets(world: int, is_sp: bool) -> tuple[list[tuple], list[int]]:
    """(the distinct token sets, and for each rank the index of the set it holds)."""
    if is_sp:
        return [_tokens(100 + r, SP_COUNTS[r]) for r in range(world)], list(range(world))
    groups = REPLICA_GROUPS[world]
    sets = [_tokens(200 + i, n) for i, n in enumerate(REPLICA_COUNTS[world])]
    owner = [next(i for i, g in enumerate(groups) if r in g) for r in range(world)]
    return sets, owner


def _reference_layer() -> MoEFeedForward:
    torch.manual_seed(0)
    return MoEFeedForward(DIM, EXPERTS, TOP_K, HIDDEN, shared_expert=False)


def _local_layer(group) -> MoEFeedForward:
    ref = _reference_layer()
    layer = MoEFeedForward(DIM, EXPERTS, TOP_K, HIDDEN, shared_expert=False, ep_group=group)
    layer.load_state_dict({k: v for k, v in ref.state_dict().items() if k in layer.state_dict()}, strict=True)
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def _manager_worker(rank: int, world: int, backend: str, is_sp: bool) -> dict:
    from omni_runtime.parallel.group_coordinator import GroupCoordinator

    group = GroupCoordinator([list(range(world))], rank, "gloo", group_name="ep")
    try:
        replica = None if is_sp else REPLICA_GROUPS[world]
        attach_all2all_manager(group, backend, replica, num_experts=EXPERTS)
        comm = group.device_communicator
        sets, owner = _token_sets(world, is_sp)
        x, w, ids = sets[owner[rank]]
        # per-token tag that travels with the token: its index in the concatenation of all token sets
        offset = sum(s[0].shape[0] for s in sets[:owner[rank]])
        tag = torch.arange(offset, offset + x.shape[0], dtype=torch.int64)
        layer = _local_layer(group)
        comm.stats.reset()
        h, dw, dids, extra = comm.dispatch(x, w, ids, is_sequence_parallel=is_sp, extra_tensors=[tag, x * 2])
        everything = torch.cat([s[0] for s in sets])
        extras_ok = bool(torch.equal(everything[extra[0]], h) and torch.equal(extra[1], h * 2))
        out = comm.combine(layer.experts_forward(h, dw, dids), is_sequence_parallel=is_sp)
        expected = _reference_layer().experts_forward(x, w, ids)
        res = {"shape": list(out.shape), "expected_shape": list(expected.shape), "rel": _rel(out, expected),
               "extras_ok": extras_ok, "bytes": dict(comm.stats.bytes_by_kind), "dispatched_rows": h.shape[0]}
        if backend == "alltoallv" and is_sp:
            per = EXPERTS // world
            mine = local_expert_range(EXPERTS, world, rank)
            row = DIM * 4
            res["expected_dispatch_bytes"] = int((ids // per != rank).sum()) * row
            res["expected_combine_bytes"] = sum(int(torch.isin(sets[r][2], torch.tensor(list(mine))).sum())
                                                for r in range(world) if r != rank) * row
        if backend in ("naive", "agrs"):
            logits = torch.randn(x.shape[0], EXPERTS, generator=torch.Generator().manual_seed(rank))
            gh, gl = comm.dispatch_router_logits(x, logits, is_sequence_parallel=True)
            all_logits = torch.cat([torch.randn(SP_COUNTS[r] if is_sp else sets[owner[r]][0].shape[0], EXPERTS,
                                                generator=torch.Generator().manual_seed(r)) for r in range(world)])
            all_x = torch.cat([sets[owner[r]][0] for r in range(world)])
            res["router_logits_ok"] = bool(torch.equal(gh, all_x) and torch.equal(gl, all_logits))
        return res
    finally:
        group.destroy()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("backend", CPU_CAPABLE_BACKENDS)
@pytest.mark.parametrize("is_sp", [True, False], ids=["sequence_parallel", "replicated"])
def test_manager_matches_single_process_moe(world: int, backend: str, is_sp: bool) -> None:
    results = run_workers(_manager_worker, world, args=(backend, is_sp), init_process_group=True, timeout=60)
    for rank, res in enumerate(results):
        assert res["shape"] == res["expected_shape"], (rank, res)
        assert res["rel"] <= 1e-5, (rank, res["rel"])
        assert res["extras_ok"], rank
        if "router_logits_ok" in res:
            assert res["router_logits_ok"], rank
        if "expected_dispatch_bytes" in res:
            # all-to-all-v moves exactly the routed (token, expert) pairs that leave the rank, and back
            assert res["bytes"]["dispatch"] == res["expected_dispatch_bytes"], (rank, res["bytes"])
            assert res["bytes"]["combine"] == res["expected_combine_bytes"], (rank, res["bytes"])
            assert res["bytes"]["dispatch_extra"] == res["expected_dispatch_bytes"] // (DIM * 4) * (8 + DIM * 4)
    if not is_sp:
        # a replica group's ranks get identical outputs, and the tokens really were split among them
        for g in REPLICA_GROUPS[world]:
            assert len({results[r]["shape"][0] for r in g}) == 1


def _served_ep_rank(rank: int, world: int, parallel: dict) -> dict:
    """What a served denoiser rank builds: WorkerSpec -> ``_init_distributed`` (Mesh) -> ``init_expert_parallel``."""
    import os

    import msgspec

    from omni_runtime.parallel.parallel_spec import ParallelSpec
    from omni_runtime.runtime.stage_worker import WorkerSpec, _init_distributed

    spec = WorkerSpec(stage="denoiser", replica=0, rank=rank, world_size=world,
                      master_port=int(os.environ["MASTER_PORT"]), model_path="unused", dtype="float32", device="cpu",
                      in_addr="ipc://unused", out_addr="ipc://unused", max_batch_size=1, batch_timeout_ms=0.0,
                      instance="test", parent_pid=os.getpid(), parallel=msgspec.to_builtins(ParallelSpec(**parallel)))
    spec = msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=WorkerSpec)  # as the launcher hands it over
    mesh = _init_distributed(spec)
    try:
        group = init_expert_parallel(mesh)
        manager = group.device_communicator.all2all_manager
        res = {"backend": manager.backend, "ranks": list(group.ranks), "replica_group": manager.replica_group}
        # replicated tokens (the dp ranks run the same batch): each rank's output equals the reference
        x, w, ids = _tokens(7, 6)
        manager.set_num_experts(EXPERTS)
        comm = mesh.group("ep").device_communicator
        comm.stats.reset()
        h, dw, dids = comm.dispatch(x, w, ids)
        out = comm.combine(_local_layer(group).experts_forward(h, dw, dids))
        res["rel"] = _rel(out, _reference_layer().experts_forward(x, w, ids))
        res["counted"] = sorted(comm.stats.bytes_by_kind)
        res["mesh_counted"] = mesh.comm_stats().bytes_by_kind == comm.stats.bytes_by_kind
        mesh.destroy()
        res["destroyed"] = comm.all2all_manager is None
        return res
    finally:
        mesh.destroy()


@pytest.mark.distributed
@pytest.mark.parametrize("parallel,replicas", [({"dp": 2, "ep": 2, "all2all_backend": "alltoallv"}, [[0, 1]] * 2),
                                               ({"ulysses": 2, "ep": 2, "all2all_backend": "naive"}, [[0], [1]])])
def test_served_rank_builds_the_ep_group_from_its_mesh(parallel: dict, replicas: list) -> None:
    results = run_workers(_served_ep_rank, 2, args=(parallel,), timeout=60)
    for rank, res in enumerate(results):
        assert res["backend"] == parallel["all2all_backend"] and res["ranks"] == [0, 1]
        assert res["replica_group"] == replicas[rank]
        assert res["rel"] <= 1e-5, (rank, res["rel"])
        assert "meta" in res["counted"] and res["mesh_counted"] and res["destroyed"]


def test_no_ep_group_without_ep() -> None:
    from omni_runtime.parallel.mesh import Mesh

    assert init_expert_parallel(None) is None and init_expert_parallel(Mesh.single()) is None


def test_unused_experts_and_zero_token_rank_are_exercised() -> None:
    # the data of the tests above: a rank with no tokens, and experts no token is routed to
    assert 0 in SP_COUNTS and 0 in REPLICA_COUNTS[3]
    used = torch.cat([_tokens(100 + r, n)[2].flatten() for r, n in enumerate(SP_COUNTS)]).unique().tolist()
    assert not set(UNUSED_EXPERTS) & set(used) and len(used) == EXPERTS - len(UNUSED_EXPERTS)


# ---------------------------------------------------------------------------------------------- GPU managers

def _stub_group() -> types.SimpleNamespace:
    comm = types.SimpleNamespace(device=torch.device("cpu"), world_size=2, rank_in_group=0, unique_name="ep:0",
                                 ranks=[0, 1])
    return types.SimpleNamespace(device_communicator=comm)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the CPU-only error")
@pytest.mark.parametrize("backend,package", [("deepep_high_throughput", "deep_ep"),
                                             ("deepep_low_latency", "deep_ep")])
def test_gpu_manager_on_cpu_raises_the_clear_error(backend: str, package: str) -> None:
    cls = ALL2ALL_BACKENDS[backend]
    with pytest.raises(All2AllBackendUnavailable) as err:
        attach_all2all_manager(_stub_group(), backend, num_experts=4)
    msg = str(err.value)
    assert f"all2all_backend = {backend!r} ({cls.__name__}) needs CUDA GPUs and the {package!r} library" in msg
    assert "CUDA (torch sees no GPU)" in msg
    assert "Use a CPU-capable backend instead: 'alltoallv'" in msg


def test_unknown_backend_names_the_allowed_values() -> None:
    with pytest.raises(All2AllError, match=r"all2all_backend = 'deepep': allowed values are naive, agrs, alltoallv, "
                                           r"deepep_high_throughput, deepep_low_latency$"):
        attach_all2all_manager(_stub_group(), "deepep")


def test_deepep_ht_kwargs() -> None:
    intra = DeepEPHTAll2AllManager._make_all2all_kwargs(internode=False)
    assert intra == dict(group=None, num_nvl_bytes=1024 * 1024 * 1024, num_rdma_bytes=0, low_latency_mode=False,
                         num_qps_per_rank=1)
    inter = DeepEPHTAll2AllManager._make_all2all_kwargs(internode=True, buffer_size_mb=256, num_sms=24)
    assert inter == dict(group=None, num_nvl_bytes=268435456, num_rdma_bytes=268435456, low_latency_mode=False,
                         num_qps_per_rank=12)


def test_low_latency_rdma_size_by_hand() -> None:
    # T=128 tokens/rank, hidden 1024 (8 scale groups), 8 experts:
    #   dispatch msg = 16 + max(2048, 1024 + 32) = 2064;  combine msg = 32 + 2048 = 2080
    #   send = max(128*2064, 8*128*2080) = 2129920;  recv = max(8*128*2064, 8*128*2080) = 2129920
    #   signal = align128(8*4) = 128;  total = 2*2129920 + 2*2129920 + 2*128 = 8519936
    #   hint = (8519936 + 128) // 128 * 128 = 8520064
    assert low_latency_rdma_size_hint(128, 1024, 4, 8) == 8520064
    # T=1, hidden 128 (1 scale), 2 experts: dispatch 16+256=272, combine 4+256=260, send max(272, 520)=520,
    # recv max(544, 520)=544, signal 128: total 2*520+2*544+256 = 2384 -> (2384+128)//128*128 = 2432
    assert low_latency_rdma_size_hint(1, 128, 2, 2) == 2432
    with pytest.raises(All2AllError, match="hidden = 100"):
        low_latency_rdma_size_hint(1, 100, 2, 2)
    with pytest.raises(All2AllError, match="num_experts = 3"):
        low_latency_rdma_size_hint(1, 128, 2, 3)


def test_deepep_ll_kwargs() -> None:
    kw = DeepEPLLAll2AllManager._make_all2all_kwargs(128, 1024, 4, 8, 2)
    assert kw == dict(group=None, num_nvl_bytes=1 << 30, num_rdma_bytes=8520064, low_latency_mode=True,
                      num_qps_per_rank=2, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False)
    with pytest.raises(All2AllError, match="num_global_experts = 8 must equal num_local_experts 3 x num_ep_ranks 4"):
        DeepEPLLAll2AllManager._make_all2all_kwargs(128, 1024, 4, 8, 3)


def test_local_expert_range() -> None:
    assert list(local_expert_range(12, 3, 1)) == [4, 5, 6, 7]
    with pytest.raises(All2AllError, match="num_experts = 4 is not divisible by the expert-parallel size ep = 3"):
        local_expert_range(4, 3, 0)
