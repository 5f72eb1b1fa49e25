"""``[stages.denoiser.parallel] ep / all2all_backend``: bad values are one error naming the key; the groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from omni_runtime.parallel import parallel_spec
from omni_runtime.parallel.all2all import ALL2ALL_BACKENDS, CPU_CAPABLE_BACKENDS
from omni_runtime.parallel.parallel_spec import ParallelSpec, ParallelSpecError
from omni_runtime.runtime.cli import main
from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import load_config
from omni_runtime.runtime.layout import rank_groups

BASE = """
[model]
path = "models/m"
"""


def _load(tmp_path: Path, parallel: str, device: str = "cpu"):
    p = tmp_path / "c.toml"
    p.write_text(BASE + f'device = "{device}"\n[stages.denoiser.parallel]\n{parallel}\n')
    return load_config(p)


def test_backend_lists_agree() -> None:
    assert parallel_spec.ALL2ALL_BACKEND_NAMES == tuple(ALL2ALL_BACKENDS)
    assert parallel_spec.CPU_ALL2ALL_BACKEND_NAMES == CPU_CAPABLE_BACKENDS


@pytest.mark.parametrize("parallel,message", [
    ('dp = 2\nep = 2\nall2all_backend = "deepep"',
     "stages.denoiser.parallel.all2all_backend = 'deepep': allowed values are 'naive', 'agrs', 'alltoallv', "
     "'deepep_high_throughput'"),
    ("dp = 2\nep = 2\nall2all_backend = 3", "stages.denoiser.parallel.all2all_backend = 3 (int): must be a string"),
    ("ep = 0", "stages.denoiser.parallel.ep = 0: must be an integer >= 1"),
    ('ep = "2"', "stages.denoiser.parallel.ep = '2' (str): must be an integer"),
    ("ulysses = 2\nep = 3", "stages.denoiser.parallel.ep = 3: the expert-parallel group spans the data-parallel x "
                            "sequence-parallel ranks, so ep must be 1 or dp x ulysses x ring = 1 x 2 x 1 = 2"),
    ("ep = 2", "stages.denoiser.parallel.ep = 2: the expert-parallel group spans the data-parallel x "
               "sequence-parallel ranks, so ep must be 1 or dp x ulysses x ring = 1 x 1 x 1 = 1; for ep = 2 set "
               "dp = 2 (the data-parallel ranks of the expert group run the same batch)"),
    ("dp = 2\nep = 4", "stages.denoiser.parallel.ep = 4: the expert-parallel group spans the data-parallel x "
                       "sequence-parallel ranks, so ep must be 1 or dp x ulysses x ring = 2 x 1 x 1 = 2"),
    ("dp = 2", "stages.denoiser.parallel.dp = 2: not supported yet"),
    ('dp = 2\nep = 2\nall2all_backend = "deepep_high_throughput"',
     "stages.denoiser.parallel.all2all_backend = 'deepep_high_throughput': needs CUDA GPUs and its kernel library, but "
     "model.device = 'cpu'; allowed on CPU: 'naive', 'agrs', 'alltoallv'"),
])
def test_bad_ep_values(tmp_path: Path, parallel: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, parallel)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("parallel,world", [("dp = 2\nep = 2", 2), ("dp = 4\nep = 4", 4),
                                            ("ulysses = 2\nep = 2", 2), ("ulysses = 2\ndp = 2\nep = 4", 4),
                                            ("ep = 1", 1), ("ulysses = 2", 2)])
def test_world_size_with_ep(tmp_path: Path, parallel: str, world: int) -> None:
    assert _load(tmp_path, parallel).stages.denoiser.world_size == world


def test_gpu_backend_is_accepted_for_cuda_configs(tmp_path: Path) -> None:
    cfg = _load(tmp_path, 'dp = 2\nep = 2\nall2all_backend = "deepep_high_throughput"', device="cuda")
    assert cfg.stages.denoiser.parallel.all2all_backend == "deepep_high_throughput"


def test_spec_rejects_an_unknown_backend() -> None:
    with pytest.raises(ParallelSpecError, match="all2all_backend 'nccl' is not known; allowed: naive, agrs"):
        ParallelSpec(dp=2, ep=2, all2all_backend="nccl")


def test_ep_group_follows_dp_times_sp() -> None:
    # ulysses 2 x dp 2, ep 4: sp groups [0,1],[2,3]; the EP group is every rank, dp groups are strided
    spec = ParallelSpec(ulysses=2, dp=2, ep=4)
    groups = rank_groups(spec)
    assert [g["ep"] for g in groups] == [[0, 1, 2, 3]] * 4
    assert [g["dp"] for g in groups] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [g["sp"] for g in groups] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    # EP-group ranks with the same sp index hold the same tokens (the dp ranks run the same batch)
    assert spec.ep_replica_groups() == [[0, 2], [1, 3]]
    assert ParallelSpec(dp=2, ep=2).ep_replica_groups() == [[0, 1]]
    assert ParallelSpec(ulysses=2, ep=2).ep_replica_groups() == [[0], [1]]
    # cfg 2: two EP groups, one per branch; within each, the index is sp_i + sp x dp_i
    cfg2 = ParallelSpec(ulysses=2, cfg=2, dp=2, ep=4)
    assert cfg2.group_ranks()["ep"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert cfg2.ep_replica_groups() == [[0, 2], [1, 3]]
    assert rank_groups(ParallelSpec(ulysses=2))[0]["ep"] == [0]


def test_check_prints_the_ep_group(tmp_path: Path, tiny_dir: Path, capsys) -> None:
    p = tmp_path / "c.toml"
    p.write_text(f'[model]\npath = "{tiny_dir}"\n[stages.denoiser.parallel]\ndp = 2\nep = 2\n'
                 f'all2all_backend = "alltoallv"\n')
    assert main(["check", str(p)]) == 0
    out = capsys.readouterr().out
    assert "dp 2 × ep 2 (alltoallv)" in out
    assert "denoiser[0] rank 1/2 on cpu: world=[0, 1] dp=[0, 1] ep=[0, 1] " in out, out


@pytest.mark.parametrize("backend", ["flashinfer_nvlink_one_sided", "flashinfer_nvlink_two_sided", "nixl_ep"])
def test_backends_without_a_manager_are_refused_by_every_spec(backend: str, tmp_path: Path) -> None:
    """No stubs: the FlashInfer and NIXL EP managers of the reference are not in this build (even on CUDA)."""
    from omni_runtime.parallel.parallel_spec import ParallelSpec, ParallelSpecError

    with pytest.raises(ParallelSpecError, match=rf"all2all_backend '{backend}' is not known; allowed: naive, agrs, "
                                                rf"alltoallv, deepep_high_throughput, deepep_low_latency$"):
        ParallelSpec(ep=2, dp=2, all2all_backend=backend)
    with pytest.raises(ConfigError, match=rf"all2all_backend = '{backend}': allowed values are 'naive', 'agrs', "
                                          rf"'alltoallv', 'deepep_high_throughput', 'deepep_low_latency'$"):
        _load(tmp_path, f'dp = 2\nep = 2\nall2all_backend = "{backend}"')
