"""``[stages.denoiser] cpu_linear``: the transformer's linear layers on oneDNN (float32, CPU), checked against
torch's own linear (rtol 1e-5 per layer) and, through the served/in-process pipeline tests, against diffusers."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.stages import cpu_linear
from omni_runtime.stages.cpu_linear import CPU_LINEAR, linear_gelu_tanh, onednn_available, use_onednn

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear")


class _Lora(nn.Linear):  # a subclass with its own forward: must keep it
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def _model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8, bias=False), _Lora(8, 8)).to(dtype)


def test_switches_plain_linears_and_matches_torch() -> None:
    model, ref = _model(), _model()
    assert use_onednn(model, torch.float32, torch.device("cpu")) == 2  # not the subclass
    assert model[3].forward.__func__ is _Lora.forward
    for x in (torch.randn(3, 5, 24), torch.randn(5, 3, 24).transpose(0, 1), torch.randn(2, 10, 24)[:, ::2]):
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an empty batch goes through torch's linear
        assert model(torch.randn(0, 24)).shape == (0, 8)
    x = torch.randn(4, 24, requires_grad=True)  # autograd on: torch's linear, so a gradient exists
    model(x).sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None


def test_linear_gelu_tanh_fuses_on_switched_layers_only() -> None:
    fused, plain = nn.Linear(24, 40), nn.Linear(24, 40)
    plain.load_state_dict(fused.state_dict())
    use_onednn(fused, torch.float32, torch.device("cpu"))
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        want = F.gelu(F.linear(x, plain.weight, plain.bias), approximate="tanh")
        torch.testing.assert_close(linear_gelu_tanh(fused, x), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(linear_gelu_tanh(plain, x), want)


@pytest.mark.parametrize(("dtype", "device"), [(torch.bfloat16, "cpu"), (torch.float64, "cpu"),
                                               (torch.float32, "meta")])
def test_other_dtypes_and_devices_keep_torchs_linear(dtype, device) -> None:
    model = _model(dtype)
    assert use_onednn(model, dtype, torch.device(device)) == 0
    assert not any(hasattr(m, "_omni_onednn") for m in model.modules())


def test_a_failing_probe_keeps_torchs_linear_and_says_why(monkeypatch, caplog) -> None:
    monkeypatch.setattr(cpu_linear, "_self_check", lambda: "its results differ from torch's linear")
    model = _model()
    with caplog.at_level(logging.WARNING):
        assert use_onednn(model, torch.float32, torch.device("cpu")) == 0
    assert "cpu_linear = 'onednn' unavailable (its results differ" in caplog.text
    monkeypatch.undo()
    assert cpu_linear._self_check() == ""  # the real probe passes on this build


def test_denoiser_load_switches_and_both_kernels_agree(tiny_dir: Path) -> None:
    from omni_runtime.stages.denoiser import DenoiserStage

    one = DenoiserStage.from_pretrained(tiny_dir, cpu_linear="onednn")
    tor = DenoiserStage.from_pretrained(tiny_dir, cpu_linear="torch")
    marked = [m for m in one.model.modules() if getattr(m, "_omni_onednn", False)]
    assert marked and len(marked) == sum(type(m) is nn.Linear for m in one.model.modules())
    assert not any(hasattr(m, "_omni_onednn") for m in tor.model.modules())
    g = torch.Generator().manual_seed(0)
    cfg = one.model.config
    args = dict(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.7]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None)
    with torch.no_grad():
        a, b = one.model(**args), tor.model(**args)
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
    with pytest.raises(ValueError, match="cpu_linear = 'mkl': allowed values are \\('onednn', 'torch'\\)"):
        DenoiserStage.from_pretrained(tiny_dir, cpu_linear="mkl")


@pytest.mark.parametrize(("value", "match"), [
    ("mkl", "stages.denoiser.cpu_linear = 'mkl': allowed values are 'onednn', 'torch'"),
    (1, "stages.denoiser.cpu_linear = 1 \\(int\\): must be a string"),
])
def test_bad_cpu_linear_config_names_the_key(value, match) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model": {"path": "/m"}, "stages": {"denoiser": {"cpu_linear": value}}})
    assert CPU_LINEAR == ("onednn", "torch")
    assert config_from_dict({"model": {"path": "/m"}}).stages.denoiser.cpu_linear == "onednn"
    with pytest.raises(ConfigError, match="stages.vae.cpu_linear: unknown key"):
        config_from_dict({"model": {"path": "/m"}, "stages": {"vae": {"cpu_linear": "torch"}}})


def test_the_key_reaches_the_denoiser_ranks_and_the_in_process_engines(tiny_dir: Path) -> None:
    from omni_runtime.runtime.launcher import LocalLauncher
    from omni_runtime.runtime.stage_client import in_process_stages
    from omni_runtime.runtime.stage_worker import stage_options

    for value in CPU_LINEAR:
        cfg = config_from_dict({"model": {"path": str(tiny_dir)}, "stages": {"denoiser": {"cpu_linear": value}}})
        launcher = LocalLauncher(cfg)
        try:
            specs = [s for reps in launcher.replicas.values() for r in reps for s in r.specs()]
            den = [s for s in specs if s.stage == "denoiser"]
            assert den and {s.cpu_linear for s in den} == {value}
            assert stage_options("denoiser", cpu_linear=den[0].cpu_linear)["cpu_linear"] == value
        finally:
            launcher.shutdown()
    # the in-process path (Omni(in_process=True)) loads the same engines with the same option
    for value, switched in (("torch", False), ("onednn", True)):
        cfg = config_from_dict({"model": {"path": str(tiny_dir)}, "stages": {"denoiser": {"cpu_linear": value}}})
        stages = asyncio.run(in_process_stages(cfg))
        model = stages.clients["denoiser"][0].executor.engine.stage.model
        assert any(hasattr(m, "_omni_onednn") for m in model.modules()) == switched
