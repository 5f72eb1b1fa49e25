"""``Mesh``: what ``omni-runtime check`` prints (``layout.rank_groups``) equals what the spawned stage workers build
(``stage_worker._init_distributed`` -> ``Mesh.build``), every group communicates, and the single-process mesh."""

from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec
import pytest
import torch
from spawn import run_workers

from omni_runtime.parallel.mesh import Mesh, MeshError, backend_for, current_mesh
from omni_runtime.parallel.parallel_spec import GROUP_NAMES, ParallelSpec, ParallelSpecError
from omni_runtime.runtime.cli import main
from omni_runtime.runtime.layout import rank_groups, shown_groups

ROOT = Path(__file__).resolve().parent.parent


def _worker_spec(rank: int, parallel: dict, port: int) -> bytes:
    from omni_runtime.runtime.stage_worker import WorkerSpec

    spec = WorkerSpec(stage="denoiser", replica=0, rank=rank, world_size=ParallelSpec(**parallel).world_size,
                      master_port=port, model_path="unused", dtype="float32", device="cpu", in_addr="ipc://unused",
                      out_addr="ipc://unused", max_batch_size=1, batch_timeout_ms=0.0, instance="test",
                      parent_pid=os.getpid(), parallel=msgspec.to_builtins(ParallelSpec(**parallel)))
    return msgspec.msgpack.encode(spec)


def _stage_rank(rank: int, world_size: int, parallel: dict) -> dict:
    """What a denoiser rank process builds: its mesh from the WorkerSpec, as the worker does."""
    from omni_runtime.runtime.stage_worker import WorkerSpec, _init_distributed

    spec = msgspec.msgpack.decode(_worker_spec(rank, parallel, int(os.environ["MASTER_PORT"])), type=WorkerSpec)
    mesh = _init_distributed(spec)
    try:
        assert current_mesh() is mesh
        report = mesh.groups_report()
        # every group really communicates: the sum of the global ranks over the group
        sums = {name: int(mesh.group(name).all_reduce(torch.tensor([rank])).item()) for name in GROUP_NAMES}
        sizes = {name: [mesh.size(name), mesh.rank(name)] for name in GROUP_NAMES}
        backends = sorted({mesh.group(n).backend for n in GROUP_NAMES if mesh.size(n) > 1})
        return {"report": report, "sums": sums, "sizes": sizes, "backends": backends}
    finally:
        mesh.destroy()


def _check_groups(results: list[dict], spec: ParallelSpec) -> None:
    expected = rank_groups(spec)
    assert len(results) == spec.world_size
    for rank, res in enumerate(results):
        assert res["report"] == expected[rank], rank
        assert res["sums"] == {n: sum(g) for n, g in expected[rank].items()}, rank
        assert res["sizes"] == {n: [len(g), g.index(rank)] for n, g in expected[rank].items()}, rank
        assert res["backends"] == ["gloo"]


def _printed_groups(out: str, stage: str) -> dict[int, dict[str, list[int]]]:
    """``check``'s lines ``  denoiser[0] rank R/W on cpu: world=[...] sp=[...]`` as ``{R: {name: ranks}}``."""
    got = {}
    for m in re.finditer(rf"^  {stage}\[0\] rank (\d+)/\d+ on \S+: (.*)$", out, re.M):
        got[int(m.group(1))] = {k: [int(x) for x in v.split(", ")]
                                for k, v in re.findall(r"(\w+)=\[([\d, ]+)\]", m.group(2))}
    return got


@pytest.mark.distributed
def test_check_prints_the_groups_the_workers_build_ulysses2_ring2(capsys):
    assert main(["check", str(ROOT / "configs" / "usp4.toml")]) == 0
    printed = _printed_groups(capsys.readouterr().out, "denoiser")
    results = run_workers(_stage_rank, 4, args=({"ulysses": 2, "ring": 2},), timeout=120)
    assert sorted(printed) == [0, 1, 2, 3]
    for rank, res in enumerate(results):
        assert printed[rank] == shown_groups(res["report"]), rank
    assert printed[3] == {"world": [0, 1, 2, 3], "sp": [0, 1, 2, 3], "ulysses": [2, 3], "ring": [1, 3]}
    _check_groups(results, ParallelSpec(ulysses=2, ring=2))


@pytest.mark.distributed
def test_workers_build_cfg2_pp2_groups():
    # cfg and pp do not run yet (the config rejects them), but the mesh is built and reported already
    spec = ParallelSpec(cfg=2, pp=2)
    results = run_workers(_stage_rank, 4, args=({"cfg": 2, "pp": 2},), timeout=120)
    _check_groups(results, spec)
    assert [r["report"]["pp"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["report"]["cfg"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_single_mesh_needs_no_torch_distributed():
    import torch.distributed as dist

    mesh = Mesh.single()
    assert not dist.is_initialized()
    assert mesh.groups_report() == {name: [0] for name in GROUP_NAMES}
    assert [mesh.size(n) for n in GROUP_NAMES] == [1] * len(GROUP_NAMES) and mesh.rank("sp") == 0
    x = torch.arange(4.0)
    assert mesh.group("sp").all_gather(x, dim=0) is x
    with pytest.raises(MeshError, match=r"unknown mesh group 'spp'; allowed: world, tp, sp, ulysses, ring"):
        mesh.group("spp")
    mesh.destroy()
    with pytest.raises(MeshError, match="the mesh was destroyed"):
        mesh.size("sp")


@pytest.mark.parametrize("rank, init_method, message", [
    (2, None, r"rank=2: must be an integer from 0 to 1 \(world size 2: ulysses 2\)"),
    (-1, None, "rank=-1: must be an integer"),
    (0, None, "init_method=None with world size 2: a tcp://host:port or file://path rendezvous is needed"),
    (0, "udp://x:1", "init_method='udp://x:1': allowed are"),
])
def test_build_rejects_bad_arguments(rank, init_method, message):
    import torch.distributed as dist

    with pytest.raises(MeshError, match=message):
        Mesh.build(ParallelSpec(ulysses=2), rank, init_method, "cpu")
    assert not dist.is_initialized()
    with pytest.raises(MeshError, match="spec must be a ParallelSpec, got dict"):
        Mesh.build({"ulysses": 2}, 0, None, "cpu")  # type: ignore[arg-type]


def test_backend_follows_the_device():
    assert backend_for(torch.device("cuda:1")) == "nccl" and backend_for("cuda") == "nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


def test_worker_spec_parallel_round_trips_through_config_names():
    d = msgspec.to_builtins(ParallelSpec(ulysses=2, vae_patch=2))
    assert d["patch"] == 2 and "vae_patch" not in d
    assert msgspec.convert(d, ParallelSpec) == ParallelSpec(ulysses=2, vae_patch=2)
    with pytest.raises(msgspec.ValidationError, match="ulysses must be a positive integer, got 0"):
        msgspec.convert({"ulysses": 0}, ParallelSpec)
    with pytest.raises(ParallelSpecError):
        ParallelSpec(ulysses=2, ring=2).check_world_size(2)
