"""The mesh: group membership from ParallelSpec.group_ranks and from real processes (through the seed-compatible
``parallel.state`` facade), spec errors, lifecycle, the single-process defaults and the pipeline layer split."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from spawn import run_workers

from omni_runtime.parallel import state
from omni_runtime.parallel.parallel_spec import ParallelSpec, ParallelSpecError
from omni_runtime.parallel.utils import (
    cat_views,
    divide,
    ensure_divisibility,
    get_pp_indices,
    pad_dim,
    split_tensor_along_last_dim,
)

S8 = [[r] for r in range(8)]
S4 = [[r] for r in range(4)]

# (world size, ParallelSpec kwargs, the groups we expect). Kinds not listed are singletons.
MESHES: dict[str, tuple[int, dict, dict[str, list[list[int]]]]] = {
    "u2xr2xcfg2": (8, dict(ulysses=2, ring=2, cfg=2), {
        "sp": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "ulysses": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "ring": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "cfg": [[0, 4], [1, 5], [2, 6], [3, 7]],
    }),
    "sp4(u2xr2)xpp2": (8, dict(ulysses=2, ring=2, pp=2), {
        "sp": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "ulysses": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "ring": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    }),
    "hsdp2x4": (8, dict(dp=8, hsdp_shard=2, hsdp_replicate=4), {
        "dp": [list(range(8))],
        "hsdp_shard": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "hsdp_replicate": [[0, 2, 4, 6], [1, 3, 5, 7]],
    }),
    "u2xcfg2_dp2": (8, dict(ulysses=2, cfg=2, dp=2), {
        "sp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "ulysses": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "cfg": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "dp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    }),
    "u4": (4, dict(ulysses=4), {
        "sp": [[0, 1, 2, 3]],
        "ulysses": [[0, 1, 2, 3]],
    }),
    "r2xcfg2": (4, dict(ring=2, cfg=2), {
        "sp": [[0, 1], [2, 3]],
        "ring": [[0, 1], [2, 3]],
        "cfg": [[0, 2], [1, 3]],
    }),
    "u2_dp2_inferred": (4, dict(ulysses=2, dp=2), {
        "sp": [[0, 1], [2, 3]],
        "ulysses": [[0, 1], [2, 3]],
        "dp": [[0, 2], [1, 3]],
    }),
    "r4_with_hsdp4x1": (4, dict(ring=4, hsdp_shard=4, hsdp_replicate=1), {
        "sp": [[0, 1, 2, 3]],
        "ring": [[0, 1, 2, 3]],
        "hsdp_shard": [[0, 1, 2, 3]],
    }),
}
KINDS = ("sp", "ulysses", "ring", "pp", "cfg", "dp", "hsdp_shard", "hsdp_replicate")


FACADE_NAMES = {"ulysses": "ulysses_degree", "ring": "ring_degree", "cfg": "cfg_parallel_size",
                "pp": "pipeline_parallel_size", "hsdp_shard": "hsdp_shard_size", "hsdp_replicate": "hsdp_replicate_size"}


def _facade_kwargs(kwargs: dict) -> dict:
    """The initialize_model_parallel arguments of a spec (dp is inferred from the world size there)."""
    return {FACADE_NAMES[k]: v for k, v in kwargs.items() if k != "dp"}


def _expected(name: str) -> dict[str, list[list[int]]]:
    world, _, groups = MESHES[name]
    singles = S8 if world == 8 else S4
    return {kind: groups.get(kind, singles) for kind in KINDS}


# ---------------------------------------------------------------------- pure layout
@pytest.mark.parametrize("name", list(MESHES))
def test_group_ranks_pure(name):
    world, kwargs, _ = MESHES[name]
    spec = ParallelSpec(**kwargs)
    assert spec.world_size == world
    got = spec.group_ranks()
    assert got["world"] == [list(range(world))]
    assert {k: got[k] for k in KINDS} == _expected(name)
    assert all(sorted(r for g in groups for r in g) == list(range(world)) for groups in got.values())
    assert spec.groups_of(world - 1) == {k: next(g for g in v if world - 1 in g) for k, v in got.items()}


def test_ep_spans_the_data_and_sequence_ranks():
    spec = ParallelSpec(ulysses=2, cfg=2, dp=2, ep=4)  # ep = tp 1 x ulysses 2 x ring 1 x dp 2
    assert spec.group_ranks()["ep"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert ParallelSpec(ulysses=2, cfg=2).group_ranks()["ep"] == [[0], [1], [2], [3]]  # ep 1: no expert groups


def test_vae_patch_groups():
    assert ParallelSpec(vae_patch=2).world_size == 2
    assert ParallelSpec(vae_patch=2).group_ranks()["vae_patch"] == [[0, 1]]
    assert ParallelSpec(ulysses=4, vae_patch=2).group_ranks()["vae_patch"] == [[0, 1], [2, 3]]


# ---------------------------------------------------------------------- spec errors
def test_error_shows_arithmetic_when_product_does_not_divide():
    with pytest.raises(ParallelSpecError) as e:
        ParallelSpec(ulysses=2, ring=3).check_world_size(8)
    assert str(e.value) == ("tp 1 × ulysses 2 × ring 3 × pp 1 × cfg 1 × dp 1 = 6 does not equal the world size 8")


def test_error_hsdp_product():
    with pytest.raises(ParallelSpecError) as e:
        ParallelSpec(dp=8, hsdp_shard=2, hsdp_replicate=2)
    assert str(e.value) == ("hsdp_shard 2 × hsdp_replicate 2 = 4 does not equal the world size "
                            "tp 1 × ulysses 1 × ring 1 × pp 1 × cfg 1 × dp 8 = 8 (set both to 1 to disable HSDP)")


def test_error_ep_and_vae_patch():
    with pytest.raises(ParallelSpecError) as e:
        ParallelSpec(ulysses=2, ep=4)
    assert str(e.value) == ("ep 4 must be 1 or equal the ranks an expert group spans, tp 1 × ulysses 2 × ring 1 "
                            "× dp 1 = 2")
    with pytest.raises(ParallelSpecError) as e:
        ParallelSpec(ulysses=2, vae_patch=4)
    assert str(e.value) == ("vae_patch 4 does not divide the world size tp 1 × ulysses 2 × ring 1 × pp 1 × cfg 1 "
                            "× dp 1 = 2")


def test_tensor_parallel_is_reserved():
    with pytest.raises(ParallelSpecError, match="tensor parallelism is reserved; tp must be 1"):
        ParallelSpec(tp=2)
    with pytest.raises(ParallelSpecError, match="tensor parallelism is reserved; tp must be 1"):
        state.initialize_model_parallel(tensor_parallel_size=2)


@pytest.mark.parametrize("field,value", [
    ("ulysses", 0), ("ring", -1), ("cfg", 0), ("pp", -2), ("hsdp_shard", 0), ("hsdp_replicate", 1.5),
    ("ulysses", True), ("dp", 0), ("ep", 0), ("vae_patch", "2"), ("tp", None),
])
def test_degrees_must_be_positive_ints(field, value):
    with pytest.raises(ParallelSpecError) as e:
        ParallelSpec(**{field: value})
    assert str(e.value) == f"{field} must be a positive integer, got {value!r}"


def test_spec_is_frozen_and_rank_checked():
    spec = ParallelSpec(ulysses=2)
    with pytest.raises(AttributeError):
        spec.ulysses = 4
    with pytest.raises(ParallelSpecError, match="rank 2 is not a rank of a world of 2"):
        spec.groups_of(2)


# ---------------------------------------------------------------------- single process, no torch.distributed
def test_defaults_without_torch_distributed():
    assert not dist.is_initialized()
    assert not state.model_parallel_is_initialized()
    assert state.get_parallel_spec() == ParallelSpec()
    groups = [getattr(state, f"get_{k}_group")() for k in (*KINDS, "world", "tp", "ep", "pipeline_model_parallel")]
    assert [(g.world_size, g.rank_in_group, g.ranks) for g in groups] == [(1, 0, [0])] * len(groups)
    assert (state.get_tensor_model_parallel_world_size(), state.get_tensor_model_parallel_rank(),
            state.get_fully_shard_world_size()) == (1, 0, 1)
    x = torch.arange(6.0).reshape(2, 3)
    g = state.get_sp_group()
    assert g.ranks == [0]
    assert g.all_gather(x, dim=0) is x and g.all_reduce(x) is x and g.broadcast(x) is x
    assert g.broadcast_object({"a": 1}) == {"a": 1}


# ---------------------------------------------------------------------- real processes
def _mesh_worker(rank: int, world_size: int, names: list[str]) -> dict:
    state.init_distributed_environment()
    out = {}
    try:
        for name in names:
            _, kwargs, _ = MESHES[name]
            state.initialize_model_parallel(**_facade_kwargs(kwargs))
            assert state.get_parallel_spec() == ParallelSpec(**kwargs)
            getters = {k: getattr(state, f"get_{k}_group") for k in KINDS}
            groups = {k: g() for k, g in getters.items()}
            out[name] = {
                "ranks": {k: g.ranks for k, g in groups.items()},
                "rank_in_group": {k: g.rank_in_group for k, g in groups.items()},
                "world_size": {k: g.world_size for k, g in groups.items()},
                "helpers": [state.get_fully_shard_world_size(), state.get_tensor_model_parallel_world_size(),
                            state.get_tensor_model_parallel_rank(), state.get_pipeline_model_parallel_group().ranks,
                            state.current_mesh().groups_report()],
                # each group really communicates: the sum of global ranks over the group
                "sums": {k: int(g.all_reduce(torch.tensor([rank])).item()) for k, g in groups.items()},
            }
            state.ensure_model_parallel_initialized(**_facade_kwargs(kwargs))  # same degrees: accepted
            state.destroy_model_parallel()
            assert not state.model_parallel_is_initialized()
        out["world_ranks"] = state.get_world_group().ranks
    finally:
        state.destroy_distributed_environment()
    return out


def _check_mesh_results(results: list[dict], names: list[str]) -> None:
    for name in names:
        expected = _expected(name)
        for rank, res in enumerate(results):
            got = res[name]
            for kind in KINDS:
                group = next(g for g in expected[kind] if rank in g)
                assert got["ranks"][kind] == group, (name, kind, rank)
                assert got["rank_in_group"][kind] == group.index(rank), (name, kind, rank)
                assert got["world_size"][kind] == len(group), (name, kind, rank)
                assert got["sums"][kind] == sum(group), (name, kind, rank)
            h = got["helpers"]
            assert h[:4] == [got["world_size"]["hsdp_shard"], 1, 0, got["ranks"]["pp"]], (name, rank)
            assert h[4] == ParallelSpec(**MESHES[name][1]).groups_of(rank), (name, rank)
        assert [r["world_ranks"] for r in results] == [list(range(len(results)))] * len(results)


@pytest.mark.distributed
@pytest.mark.slow
def test_membership_world8_real_processes():
    names = [n for n, (w, _, _) in MESHES.items() if w == 8]
    results = run_workers(_mesh_worker, 8, args=(names,), timeout=120)
    _check_mesh_results(results, names)


@pytest.mark.distributed
def test_membership_world4_real_processes():
    names = [n for n, (w, _, _) in MESHES.items() if w == 4]
    results = run_workers(_mesh_worker, 4, args=(names,), timeout=60)
    _check_mesh_results(results, names)


def _lifecycle_worker(rank: int, world_size: int) -> dict:
    state.init_distributed_environment()
    out: dict = {}
    try:
        state.initialize_model_parallel(ulysses_degree=2)
        try:
            state.initialize_model_parallel(ulysses_degree=2)
        except RuntimeError as e:
            out["double_init"] = str(e)
        try:
            state.ensure_model_parallel_initialized(ring_degree=2)
        except ParallelSpecError as e:
            out["mismatch"] = "differs from the requested" in str(e)
        state.destroy_model_parallel()
        out["after_destroy"] = [state.get_sp_group().world_size, state.get_sp_group().ranks]
        try:
            state.initialize_model_parallel(ulysses_degree=2, ring_degree=3)
        except ParallelSpecError as e:
            out["bad_degrees"] = str(e)
        state.ensure_model_parallel_initialized(ring_degree=2)
        out["ring"] = state.get_ring_group().ranks
        out["spec"] = state.get_parallel_spec() == ParallelSpec(ring=2)
        out["same_node"] = state.in_the_same_node_as(state.get_world_group().cpu_group, source_rank=1)
    finally:
        state.destroy_distributed_environment()
    out["dist_after"] = dist.is_initialized()
    return out


@pytest.mark.distributed
def test_lifecycle_real_processes():
    results = run_workers(_lifecycle_worker, 2, timeout=60)
    for rank, r in enumerate(results):
        assert r["double_init"].startswith("model parallel groups are already initialized")
        assert r["mismatch"] is True
        assert r["after_destroy"] == [1, [rank]]
        assert r["bad_degrees"] == "ulysses 2 × ring 3 × cfg 1 × pp 1 = 6 does not divide world size 2"
        assert r["ring"] == [0, 1]
        assert r["spec"] is True
        assert r["same_node"] == [True, True]
        assert r["dist_after"] is False


def _single_process_worker(rank: int, world_size: int) -> list:
    import os

    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
        os.environ.pop(var)
    state.init_distributed_environment(world_size=1, rank=0)
    try:
        state.initialize_model_parallel()
        return [state.get_world_group().ranks, state.get_sp_group().ranks, state.get_dp_group().ranks,
                dist.get_backend()]
    finally:
        state.destroy_distributed_environment()


@pytest.mark.distributed
def test_world_of_one_needs_no_rendezvous():
    assert run_workers(_single_process_worker, 1, timeout=60) == [[[0], [0], [0], "gloo"]]


# ---------------------------------------------------------------------- utilities
@pytest.mark.parametrize("num_layers,pp_size,expected", [
    (8, 4, [2, 2, 2, 2]),
    (10, 4, [2, 3, 3, 2]),   # remainder 2 <= pp-2: middle partitions only
    (9, 4, [2, 2, 3, 2]),    # remainder 1: the last middle partition
    (11, 4, [3, 3, 3, 2]),   # remainder 3 = pp-1: all but the last
    (5, 2, [3, 2]),
    (19, 8, [2, 2, 2, 2, 3, 3, 3, 2]),  # remainder 3 <= pp-2: the middle partitions nearest the end
    (3, 3, [1, 1, 1]),
])
def test_get_pp_indices(num_layers, pp_size, expected):
    bounds = [get_pp_indices(num_layers, r, pp_size) for r in range(pp_size)]
    assert [e - s for s, e in bounds] == expected
    assert bounds[0][0] == 0 and bounds[-1][1] == num_layers
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(pp_size - 1))


def test_get_pp_indices_errors():
    with pytest.raises(ValueError, match="num_layers 3 is smaller than pipeline_parallel_size 4"):
        get_pp_indices(3, 0, 4)
    with pytest.raises(ValueError, match=r"pp_rank must be in \[0, 2\), got 2"):
        get_pp_indices(4, 2, 2)


def test_divide_and_split():
    assert divide(12, 4) == 3
    with pytest.raises(ValueError, match="10 is not divisible by 4"):
        ensure_divisibility(10, 4)
    x = torch.arange(24.0).reshape(2, 12)
    chunks = split_tensor_along_last_dim(x, 3, contiguous_split_chunks=True)
    assert [c.tolist() for c in chunks] == [x[:, 0:4].tolist(), x[:, 4:8].tolist(), x[:, 8:12].tolist()]
    assert all(c.is_contiguous() for c in chunks)
    with pytest.raises(ValueError):
        split_tensor_along_last_dim(x, 5)


def test_pad_dim_extends_one_dim_with_the_value() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    assert pad_dim(x, 1, 3) is x and pad_dim(x, 0, 1) is x
    assert torch.equal(pad_dim(x, 1, 5, -1.0), torch.tensor([[0.0, 1, 2, -1, -1], [3, 4, 5, -1, -1]]))
    assert torch.equal(pad_dim(x, 0, 3), torch.cat([x, torch.zeros(1, 3)]))
    m = pad_dim(torch.ones(1, 2, dtype=torch.bool), 1, 4, False)
    assert m.dtype == torch.bool and m.tolist() == [[True, True, False, False]]


def test_cat_views_joins_neighbouring_slices_without_a_copy_and_copies_otherwise() -> None:
    x = torch.randn(2, 7, 3, 4)
    ptr = x.untyped_storage().data_ptr()
    # [text, image] split along the sequence, as the Flux blocks do: joined again as a view of x
    for parts, dim in (([x[:, :3], x[:, 3:]], 1), ([x[:, :2], x[:, 2:5], x[:, 5:]], 1), ([x[..., :1], x[..., 1:]], -1),
                       ([x[:, :0], x], 1), ([x[:1], x[1:]], 0)):
        got = cat_views(parts, dim)
        assert torch.equal(got, torch.cat(parts, dim)) and got.untyped_storage().data_ptr() == ptr
    # not neighbours (wrong order, a gap, another tensor, another dtype): the same values as torch.cat, copied
    y = x.clone()
    for parts, dim in (([x[:, 3:], x[:, :3]], 1), ([x[:, :2], x[:, 3:]], 1), ([x[:, :3], y[:, 3:]], 1),
                       ([x[:, :3], x[:, 3:].double()], 1), ([x[:, :3, :2], x[:, 3:, 1:]], 1)):
        got = cat_views(parts, dim)
        assert torch.equal(got, torch.cat(parts, dim)) and got.untyped_storage().data_ptr() != ptr
    with pytest.raises(ValueError, match="at least one"):
        cat_views([], 0)
