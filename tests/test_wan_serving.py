"""Wan through ``serve`` in each served layout: the lossless frames of ``/v1/videos`` equal diffusers' ``WanPipeline``
(<= 2/255), as the default layout's do (tests/test_video_api.py; no default server here). One server per layout, one
video job each with CFG (its negative prompt's branch: what cfg 2 splits), 32x32, 5 frames (2 latent frames, 8
video tokens: what the sequence-parallel layouts shard), 2 steps. ``vae patch 2``: tests/test_wan_vae_patch_serving.py.

Served here: ring 2, ulysses 2 x ring 2 and hsdp_shard 2 (the denoiser and the UMT5 text encoder sharded). Ulysses 2,
cfg 2 and pp 2 alone are served for the same ``WanTransformer`` (the same family code, the same tiny sizes) by
tests/test_wan22_serving.py, with two experts and two jobs in one running set: a superset of one expert's run, so
they are not served twice (three servers less on the suite's clock)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from test_server_harness import ROOT, TEXT_ENCODER_HSDP2, assert_logged, denoiser_layout, serving

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]

BODY = {"prompt": "a dog on a beach", "negative_prompt": "blurry", "size": "32x32", "num_frames": 5,
        "num_inference_steps": 2, "guidance_scale": 4.0, "seed": 11}

# layout -> (its parallel section, what the server's log shows when the ranks really ran it)
LAYOUTS = {
    "ring2": (denoiser_layout(ring=2), ["sequence parallel over 2 ranks"]),
    "ulysses2_ring2": (denoiser_layout(ulysses=2, ring=2), ["sequence parallel over 4 ranks"]),
    "hsdp2": (denoiser_layout(hsdp_shard=2), ["HSDP: WanTransformer sharded over [0, 1]",
                                      "HSDP: UMT5EncoderModel sharded over [0, 1]"]),
}


def _serve(tmp_path, edits: dict[str, str] | None = None, logged: tuple[str, ...] = ()) -> np.ndarray:
    with serving(tmp_path, base_config="wan.toml", edits=edits) as server:
        r = httpx.post(server.url + "/v1/videos", json=BODY, headers=server.headers, timeout=60)
        assert r.status_code == 200, r.text
        frames = server.video_frames(r.json()["id"])
        assert_logged(server, logged)
        return frames


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """diffusers' ``WanPipeline`` frames of BODY: what the default layout returns through ``serve`` (<= 2/255,
    tests/test_video_api.py), so each layout is compared with them here, not with a default server of its own."""
    import torch
    from diffusers import WanPipeline

    from omni_runtime.runtime.model_store import ensure_model

    pipe = WanPipeline.from_pretrained(str(ensure_model(str(ROOT / "models" / "tiny-wan"))))
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=BODY["prompt"], negative_prompt=BODY["negative_prompt"], height=32, width=32, num_frames=5,
                num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(11),
                output_type="np").frames[0]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_equals_diffusers(tmp_path, reference, layout: str) -> None:
    parallel, logged = LAYOUTS[layout]
    edits = {**parallel, **(TEXT_ENCODER_HSDP2 if layout.startswith("hsdp") else {})}
    frames = _serve(tmp_path, edits, tuple(logged))
    assert frames.shape == reference.shape == (5, 32, 32, 3)
    diff = np.abs(frames / 255.0 - reference).max()
    print(f"{layout} vs diffusers: max |diff| {diff * 255:.2f}/255")
    assert diff <= 2 / 255, layout
