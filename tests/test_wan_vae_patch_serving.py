"""Wan's VAE patch parallelism through ``serve`` and ``check``: with ``[stages.vae.parallel] patch = 2`` the lossless
frames of ``/v1/videos`` equal diffusers' ``WanPipeline`` (<= 2/255), as the default layout's do
(tests/test_video_api.py; compared with diffusers in process here, which costs seconds where a second server costs
a minute); the config values it cannot take and the VAEs it cannot split are refused by name.

One video job per server (32x32: 4 latent rows, 2 per rank; 5 frames: 2 latent frames, so the second chunk runs
through every rank's feature cache), 2 steps, CFG with a negative prompt.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from test_server_harness import ROOT, Server

BODY = {"prompt": "a dog on a beach", "negative_prompt": "blurry", "size": "32x32", "num_frames": 5,
        "num_inference_steps": 2, "guidance_scale": 4.0, "seed": 11}
PATCH1 = "[stages.vae.parallel]\npatch = 1"


def _video(tmp_path, patch: int) -> tuple[np.ndarray, str]:
    """The frames of one video job from a server whose VAE has ``patch`` ranks, and the server's log."""
    server = Server(tmp_path, base_config="wan.toml", edits={PATCH1: f"[stages.vae.parallel]\npatch = {patch}"})
    try:
        r = httpx.post(server.url + "/v1/videos", json=BODY, headers=server.headers, timeout=60)
        assert r.status_code == 200, r.text
        frames = server.video_frames(r.json()["id"])
        assert httpx.get(server.url + "/health").status_code == 200
        return frames, server.log_text()
    finally:
        server.stop()
        assert server.shm_entries() == []


def _diffusers_frames() -> np.ndarray:
    """``WanPipeline`` on the same checkpoint, prompt and seed (float32, one process): what ``serve`` returns in the
    default layout (tests/test_video_api.py)."""
    import torch
    from diffusers import WanPipeline

    from omni_runtime.runtime.model_store import ensure_model

    pipe = WanPipeline.from_pretrained(str(ensure_model(str(ROOT / "models" / "tiny-wan"))))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=BODY["prompt"], negative_prompt=BODY["negative_prompt"], height=32, width=32, num_frames=5,
               num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(11),
               output_type="np").frames[0]
    return np.asarray(ref)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_vae_patch2_equals_diffusers_through_serve(tmp_path) -> None:
    patched, log = _video(tmp_path, 2)
    assert "vae[0] rank 1/2" in log, log[-3000:]  # the second VAE rank really ran
    assert "decoding on the driver alone" not in log  # and the split decode, not the few-rows fallback
    ref = _diffusers_frames()
    assert patched.shape == ref.shape == (5, 32, 32, 3)
    assert patched.std() > 5  # a real video, not a constant
    assert np.abs(patched / 255.0 - ref).max() <= 2 / 255


def _check(tmp_path, edits: dict[str, str]):
    from omni_runtime.runtime.config_load import load_config
    from omni_runtime.runtime.preflight import preflight

    text = (ROOT / "configs" / "wan.toml").read_text()
    for old, new in edits.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "wan.toml"
    path.write_text(text.replace('path = "../models/', f'path = "{ROOT / "models"}/'))
    return preflight(load_config(path))


def test_check_accepts_vae_patch_for_wan(tmp_path) -> None:
    lines = _check(tmp_path, {PATCH1: "[stages.vae.parallel]\npatch = 2"})
    assert any("wan" in line for line in lines), lines


@pytest.mark.parametrize(("value", "needle"), [("0", ">= 1"), ("-2", ">= 1"), ('"two"', "patch"),
                                               ("1.5", "patch")])
def test_check_refuses_bad_patch_values(tmp_path, value: str, needle: str) -> None:
    from omni_runtime.runtime.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _check(tmp_path, {PATCH1: f"[stages.vae.parallel]\npatch = {value}"})
    assert "stages.vae.parallel.patch" in str(e.value) and needle in str(e.value), str(e.value)


def test_check_refuses_tiling_with_patch(tmp_path) -> None:
    from omni_runtime.runtime.config import ConfigError

    with pytest.raises(ConfigError, match="stages.vae.tiling = true with stages.vae.parallel.patch = 2"):
        _check(tmp_path, {PATCH1: "[stages.vae.parallel]\npatch = 2",
                          "[stages.vae]\nreplicas = 1": "[stages.vae]\nreplicas = 1\ntiling = true"})


def test_wan22_vae_is_refused_by_name() -> None:
    """Wan 2.2's VAE (residual up blocks, patchified output) has no exact split here: refused, naming why."""
    from diffusers import AutoencoderKLWan

    from omni_runtime.parallel.vae_patch_parallel import VaePatchError
    from omni_runtime.stages.models.wan.family import AutoencoderKLWanKind

    vae = AutoencoderKLWan(base_dim=4, decoder_base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           is_residual=True, patch_size=2, in_channels=12, out_channels=12)
    with pytest.raises(VaePatchError, match=r"patch_size = 2 \(Wan 2.2's patchified VAE\).*patch = 1"):
        AutoencoderKLWanKind().check_patch(vae)
    vae.register_to_config(patch_size=None)
    with pytest.raises(VaePatchError, match="up block 0 of class WanResidualUpBlock"):
        AutoencoderKLWanKind().check_patch(vae)
