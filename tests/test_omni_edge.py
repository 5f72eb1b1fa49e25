"""``Omni`` is an edge like HTTP: the same work caps and machine limits, checked before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from omni_runtime.runtime import Omni
from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import load_config
from omni_runtime.runtime.requests import RequestError

ROOT = Path(__file__).resolve().parent.parent


def test_omni_refuses_work_over_the_caps_and_still_serves(tiny_dir):
    cfg = load_config(ROOT / "configs" / "default.toml")
    cfg.model.path = str(tiny_dir)
    cfg.server.max_pixels_steps = 32 * 32 * 2  # one 32x32 image with 2 steps
    with Omni(cfg, in_process=True) as omni:
        with pytest.raises(RequestError) as e:
            omni.generate("a fox", size="32x32", num_inference_steps=3, seed=1)
        assert e.value.param == "num_inference_steps" and "max_pixels_steps" in str(e.value)
        (img,) = omni.generate("a fox", size="32x32", num_inference_steps=2, seed=1)
        assert img.size == (32, 32)


def test_omni_checks_the_machine_before_starting_anything(tiny_dir):
    cfg = load_config(ROOT / "configs" / "default.toml")
    cfg.model.path = str(tiny_dir)
    cfg.stages.vae.threads = 100_000
    with pytest.raises(ConfigError, match=r"stages\.vae\.threads = 100000"):
        Omni(cfg)


def test_generate_refuses_an_unknown_keyword_naming_the_allowed_ones(tiny_dir):
    """``generate(prompt, steps=8)`` used to run the default 28 steps without a word."""
    from omni_runtime.runtime.omni import GENERATE_FIELDS
    from omni_runtime.runtime.requests import FIELDS

    cfg = load_config(ROOT / "configs" / "default.toml")
    cfg.model.path = str(tiny_dir)
    assert set(GENERATE_FIELDS) == set(FIELDS) - {"prompt", "output_format"}
    with Omni(cfg, in_process=True) as omni:
        with pytest.raises(TypeError) as e:
            omni.generate("a fox", steps=8, size="32x32")
        msg = str(e.value)
        assert "'steps'" in msg and all(f in msg for f in GENERATE_FIELDS), msg
        with pytest.raises(TypeError, match="'output_format'"):
            omni.generate("a fox", output_format="jpeg")
        (img,) = omni.generate("a fox", size="32x32", num_inference_steps=2, seed=1)  # still serves
        assert img.size == (32, 32)


@pytest.mark.parametrize("stages, named", [
    ({"denoiser": {"parallel": {"ulysses": 2}}}, "stages.denoiser.parallel (2 ranks: ulysses = 2)"),
    ({"denoiser": {"parallel": {"cfg": 2}}, "vae": {"parallel": {"patch": 2}}}, "stages.vae.parallel (2 ranks: patch = 2)"),
    ({"text_encoder": {"parallel": {"hsdp_shard": 2}}}, "stages.text_encoder.parallel (2 ranks: hsdp_shard = 2)"),
])
def test_in_process_refuses_parallel_degrees_instead_of_running_unsharded(tiny_dir, stages, named):
    from omni_runtime.runtime.config_load import config_from_dict

    cfg = config_from_dict({"model": {"path": str(tiny_dir)}, "stages": stages})
    with pytest.raises(ConfigError) as e:
        Omni(cfg, in_process=True)
    msg = str(e.value)
    assert named in msg and "in_process=False" in msg and "parallel degrees are all 1" in msg, msg
