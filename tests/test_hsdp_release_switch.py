"""``[stages.denoiser.parallel] hsdp_release_memory``: the heap release after each HSDP forward (``malloc_trim``,
``parallel.hsdp_release``) can be switched off; default on. Bad values are config errors naming the key; the value
reaches the code that registers the release through the stage's ``ParallelSpec`` (``hsdp_config_from_mesh``), and
with it off no release runs after a forward. Fast: FSDP2's ``fully_shard`` and the device mesh are stubbed (the real
sharding with the release on and off: tests/test_hsdp_steady_memory.py, slow)."""

from __future__ import annotations

import types

import pytest
import torch

from omni_runtime.parallel.parallel_spec import ParallelSpec, ParallelSpecError
from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import config_from_dict


def _config(parallel: dict, stage: str = "denoiser"):
    return config_from_dict({"model": {"path": "m"}, "stages": {stage: {"parallel": parallel}}})


def test_the_key_defaults_on_and_takes_false() -> None:
    assert _config({"hsdp_shard": 2}).stages.denoiser.parallel.hsdp_release_memory is True
    off = _config({"hsdp_shard": 2, "hsdp_release_memory": False}).stages.denoiser.parallel
    assert off.hsdp_release_memory is False and off.hsdp_shard == 2


@pytest.mark.parametrize(("parallel", "stage", "message"), [
    ({"hsdp_release_memory": "no"}, "denoiser",
     r"^stages.denoiser.parallel.hsdp_release_memory = 'no' \(str\): must be true or false$"),
    ({"hsdp_release_memory": 0}, "denoiser",
     r"^stages.denoiser.parallel.hsdp_release_memory = 0 \(int\): must be true or false$"),
    ({"hsdp_release_mem": False}, "denoiser",
     r"^stages.denoiser.parallel.hsdp_release_mem: unknown key \(value False\); allowed keys here: .*"
     r"hsdp_release_memory, hsdp_replicate, hsdp_shard, "),
    ({"hsdp_release_memory": False}, "text_encoder",
     r"^stages.text_encoder.parallel.hsdp_release_memory: unknown key \(value False\); allowed keys here: "
     r"hsdp_replicate, hsdp_shard$"),
])
def test_bad_values_are_config_errors_naming_the_key(parallel, stage, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(parallel, stage)


def test_the_spec_refuses_a_non_bool() -> None:
    with pytest.raises(ParallelSpecError, match="hsdp_release_memory must be true or false, got 1"):
        ParallelSpec(hsdp_shard=2, hsdp_release_memory=1)


class _Mesh:
    """What ``hsdp_config_from_mesh`` reads of a stage's mesh: its spec, device and groups."""

    def __init__(self, spec: ParallelSpec) -> None:
        self.spec, self.device = spec, torch.device("cpu")

    def group(self, name: str):
        return types.SimpleNamespace(group_for=lambda device: None)


@pytest.mark.parametrize("release", [True, False])
def test_the_switch_decides_whether_a_forward_releases(release, monkeypatch) -> None:
    import torch.distributed.fsdp

    from omni_runtime.parallel import hsdp, hsdp_release

    spec = _config({"hsdp_shard": 2, "hsdp_release_memory": release}).stages.denoiser.parallel
    monkeypatch.setattr(hsdp, "hsdp_device_mesh_from_groups", lambda *a: "device mesh")
    cfg = hsdp.hsdp_config_from_mesh(_Mesh(spec))
    assert cfg is not None and cfg.release_after_forward is release and cfg.device_type == "cpu"
    assert hsdp.hsdp_config_from_mesh(_Mesh(spec), release_after_forward=True).release_after_forward is True

    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", lambda module, **kw: module)
    monkeypatch.setattr(hsdp, "_mesh_for", lambda model, c: types.SimpleNamespace(mesh=torch.zeros(1, 2)))
    calls: list[int] = []
    monkeypatch.setattr(hsdp_release, "release_freed_memory", lambda: calls.append(1) or True)
    model = hsdp.apply_hsdp_to_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), cfg)
    with torch.no_grad():
        model(torch.ones(1, 2))
        model(torch.ones(1, 2))
    assert len(calls) == (2 if release else 0)


def test_the_switch_reaches_the_rank_processes(monkeypatch) -> None:
    """What the launcher hands each denoiser rank (msgpack) converts back to the spec with the switch off."""
    import os

    import msgspec

    from omni_runtime.comm import instance as rt_instance
    from omni_runtime.runtime.launcher import LocalLauncher
    from omni_runtime.runtime.stage_worker import WorkerSpec

    monkeypatch.setenv(rt_instance.INSTANCE_ENV, f"hsdprel{os.getpid()}")
    launcher = LocalLauncher(_config({"hsdp_shard": 2, "hsdp_release_memory": False}))  # starts nothing
    try:
        specs = launcher.replicas["denoiser"][0].specs()
        got = [msgspec.convert(msgspec.msgpack.decode(msgspec.msgpack.encode(s), type=WorkerSpec).parallel,
                               ParallelSpec) for s in specs]
    finally:
        launcher.shutdown()
    assert [(p.hsdp_shard, p.hsdp_release_memory) for p in got] == [(2, False), (2, False)]
