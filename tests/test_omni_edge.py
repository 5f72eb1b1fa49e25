"""``Omni`` is an edge like HTTP: the same work caps and machine limits, checked before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from omni_runtime.runtime import Omni
from omni_runtime.runtime.config import ConfigError, load_config
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
