"""``[stages.denoiser.parallel] ep / all2all_backend``: bad values are one error naming the key; the layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from omni_runtime.parallel.all2all import ALL2ALL_BACKENDS, CPU_CAPABLE_BACKENDS
from omni_runtime.runtime import config as runtime_config
from omni_runtime.runtime.cli import main
from omni_runtime.runtime.config import ConfigError, load_config
from omni_runtime.runtime.layout import denoiser_groups

BASE = """
[model]
path = "models/m"
"""


def _load(tmp_path: Path, parallel: str, device: str = "cpu"):
    p = tmp_path / "c.toml"
    p.write_text(BASE + f'device = "{device}"\n[stages.denoiser.parallel]\n{parallel}\n')
    return load_config(p)


def test_backend_lists_agree() -> None:
    assert runtime_config.ALL2ALL_BACKENDS == tuple(ALL2ALL_BACKENDS)
    assert runtime_config.CPU_ALL2ALL_BACKENDS == CPU_CAPABLE_BACKENDS


@pytest.mark.parametrize("parallel,message", [
    ('ep = 2\nall2all_backend = "deepep"',
     "stages.denoiser.parallel.all2all_backend = 'deepep': allowed values are 'naive', 'agrs', 'alltoallv', "
     "'deepep_high_throughput'"),
    ("ep = 2\nall2all_backend = 3", "stages.denoiser.parallel.all2all_backend = 3 (int): must be a string"),
    ("ep = 0", "stages.denoiser.parallel.ep = 0: must be an integer >= 1"),
    ('ep = "2"', "stages.denoiser.parallel.ep = '2' (str): must be an integer"),
    ("ulysses = 2\nep = 3", "stages.denoiser.parallel.ep = 3: the expert-parallel group spans the data-parallel x "
                            "sequence-parallel ranks, so ep must be 1 or a multiple of ulysses x ring = 2 x 1 = 2"),
    ('ep = 2\nall2all_backend = "deepep_low_latency"',
     "stages.denoiser.parallel.all2all_backend = 'deepep_low_latency': needs CUDA GPUs and its kernel library, but "
     "model.device = 'cpu'; allowed on CPU: 'naive', 'agrs', 'alltoallv'"),
])
def test_bad_ep_values(tmp_path: Path, parallel: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, parallel)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("parallel,world", [("ep = 2", 2), ("ep = 4", 4), ("ulysses = 2\nep = 2", 2),
                                            ("ulysses = 2\nep = 4", 4), ("ep = 1", 1), ("ulysses = 2", 2)])
def test_world_size_with_ep(tmp_path: Path, parallel: str, world: int) -> None:
    assert _load(tmp_path, parallel).stages.denoiser.world_size == world


def test_gpu_backend_is_accepted_for_cuda_configs(tmp_path: Path) -> None:
    cfg = _load(tmp_path, 'ep = 2\nall2all_backend = "deepep_high_throughput"', device="cuda")
    assert cfg.stages.denoiser.parallel.all2all_backend == "deepep_high_throughput"


def test_ep_group_follows_dp_times_sp() -> None:
    # ulysses 2 x ep 4: dp 2; sp groups [0,1],[2,3]; the EP group is every rank, dp groups are strided
    groups = denoiser_groups(2, 1, 1, 1, ep=4)
    assert [g["ep"] for g in groups] == [[0, 1, 2, 3]] * 4
    assert [g["dp"] for g in groups] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [g["sp"] for g in groups] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert "ep" not in denoiser_groups(2, 1, 1, 1)[0]


def test_check_prints_the_ep_group(tmp_path: Path, tiny_dir: Path, capsys) -> None:
    p = tmp_path / "c.toml"
    p.write_text(f'[model]\npath = "{tiny_dir}"\n[stages.denoiser.parallel]\nep = 2\nall2all_backend = "alltoallv"\n')
    assert main(["check", str(p)]) == 0
    out = capsys.readouterr().out
    assert "ep 2 (alltoallv)" in out
    assert "denoiser[0] rank 1/2 on cpu: world=[0, 1] sp=[1] ulysses=[1] ring=[1] pp=[1] cfg=[1] dp=[0, 1] " \
           "ep=[0, 1]" in out
