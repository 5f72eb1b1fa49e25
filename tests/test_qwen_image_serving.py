"""Qwen-Image through ``serve`` in every served layout: each layout's images equal the default layout's, and the
default layout's equal diffusers' ``QwenImagePipeline`` on the same directory (max |diff| <= 2/255 on PNG pixels).

One server per layout, two concurrent requests each at a non-square size: one without CFG and one with a negative
prompt (true CFG, rescaled, at the family's default ``true_cfg_scale`` 4.0: the request leaves it out, as diffusers'
call does; ``ModelFamily.request_defaults``), whose text lengths differ from each other and from the negative's, so the running set
pads and masks text inside one forward. ``vae patch 2`` (the causal 3D VAE's split decode): see
tests/test_qwen_vae_patch.py.

Ulysses 2 and cfg 2 are served here together (cfg2_ulysses2: a 2-rank Ulysses group in each of 2 CFG groups, the
padded and masked text of both requests sharded, the negative branch split), not each alone: alone, each runs on the
same ``QwenImageTransformer`` in tests/test_qwen_edit_serving.py (ulysses 2, cfg 2 with condition tokens), so two
servers less on the suite's clock.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from image_bytes import decode_b64
from test_server_harness import (
    ROOT,
    TEXT_ENCODER_HSDP2,
    assert_logged,
    denoiser_layout,
    post_together,
    serving,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]

MODEL = ROOT / "models" / "tiny-qwen-image"
SIZE = (64, 48)  # width, height: non-square
REQUESTS = [
    {"prompt": "a red barn", "seed": 3, "num_inference_steps": 3},
    {"prompt": "two grey cats asleep on a sofa by the window", "negative_prompt": "blurry", "seed": 5,
     "num_inference_steps": 3},
]

# layout -> (its parallel section, what the server's log shows when the ranks really ran it)
LAYOUTS = {
    "ring2": (denoiser_layout(ring=2), ["sequence parallel over 2 ranks"]),
    "ulysses2_ring2": (denoiser_layout(ulysses=2, ring=2), ["sequence parallel over 4 ranks"]),
    "cfg2_ulysses2": (denoiser_layout(cfg=2, ulysses=2), ["CFG parallel over 2 ranks",
                                                          "sequence parallel over 2 ranks"]),
    "pp2": (denoiser_layout(pp=2), ["pipeline stage 1/2 holds blocks [1, 2)"]),
    "hsdp2": (denoiser_layout(hsdp_shard=2), ["HSDP: QwenImageTransformer sharded over [0, 1]",
                                      "HSDP: Qwen2_5_VLForConditionalGeneration sharded over [0, 1]"]),
}


def _serve(tmp_path: Path, edits: dict[str, str] | None = None, logged: tuple[str, ...] = ()) -> list[np.ndarray]:
    with serving(tmp_path, base_config="qwen_image.toml", edits=edits) as server:
        out = post_together(server, "/v1/images/generations",
                            [{"json": {**req, "size": f"{SIZE[0]}x{SIZE[1]}"}} for req in REQUESTS])
        assert_logged(server, logged)
        schema = httpx.get(server.url + "/openapi.json", headers=server.headers, timeout=30).json()
        fields = schema["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]
        defaults = {k: v.get("default") for k, v in fields["schema"]["properties"].items()}
        assert (defaults["num_inference_steps"], defaults["true_cfg_scale"]) == (50, 4.0)  # QwenImagePipeline's
        return [decode_b64(r.json()["data"][0]["b64_json"]) for r in out]


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape == (SIZE[1], SIZE[0], 3), (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def diffusers_images() -> list[np.ndarray]:
    import torch
    from diffusers import QwenImagePipeline

    from omni_runtime.runtime.model_store import ensure_model

    pipe = QwenImagePipeline.from_pretrained(str(ensure_model(str(MODEL))), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for req in REQUESTS:
        kw = {k: v for k, v in req.items() if k in ("prompt", "negative_prompt", "num_inference_steps")}
        images.append(np.asarray(pipe(**kw, width=SIZE[0], height=SIZE[1], output_type="pil",
                                      generator=torch.Generator("cpu").manual_seed(req["seed"])).images[0]))
    return images


@pytest.fixture(scope="module")
def default_images(tmp_path_factory, diffusers_images) -> list[np.ndarray]:
    return _serve(tmp_path_factory.mktemp("default"))


def test_default_layout_equals_diffusers(default_images, diffusers_images) -> None:
    for ours, ref in zip(default_images, diffusers_images, strict=True):
        assert _max_diff(ours, ref) <= 2
    assert _max_diff(default_images[0], default_images[1]) > 20  # two different images, not one twice


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_equals_default(tmp_path, default_images, layout: str) -> None:
    parallel, logged = LAYOUTS[layout]
    edits = {**parallel, **(TEXT_ENCODER_HSDP2 if layout.startswith("hsdp") else {})}
    served = _serve(tmp_path, edits, tuple(logged))
    for ours, ref in zip(served, default_images, strict=True):
        assert _max_diff(ours, ref) <= 2, layout
