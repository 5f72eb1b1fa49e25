"""VAE patch parallelism for Qwen-Image's causal 3D VAE (``AutoencoderKLQwenImage``), run by the same walk as Wan's
(``stages/causal_vae_patch.py``, given Qwen-Image's module classes).

1. The distributed decode equals diffusers' ``AutoencoderKLQwenImage.decode`` of the same latents and weights: real
   processes on gloo (tests/spawn.py), the reference on rank 0 of the same process, in float64 (1e-9 x max
   |reference|: the same numbers) and float32 (1e-4 x max |reference|: float32 rounding through ~30 convolutions of
   random weights; one uint8 level is 8e-3 of the range). The VAE is made in code, deeper than the tiny preset, with
   random weights (channel changes, two 3D upsamplers and one 2D upsampler, the mid block's attention); latents of
   one frame (what QwenImagePipeline decodes) and of 3 frames (the feature cache carried across chunks), uneven row
   bands (5 latent rows over 2 ranks).
2. ``serve`` with the Qwen-Image config and ``[stages.vae.parallel] patch = 2`` returns diffusers'
   ``QwenImagePipeline``'s image (<= 2/255): one server, one 32x32 image (4 latent rows, 2 per rank), 2 steps.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from spawn import run_workers  # noqa: E402
from test_server_harness import ROOT, Server  # noqa: E402

pytestmark = [pytest.mark.distributed]


def _vae():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    with torch.no_grad():  # random, not diffusers' near-zero init: every part of the decoder moves the output
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return vae


def _exact_worker(rank: int, world: int, shapes: list[list[int]]) -> list:
    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec
    from omni_runtime.parallel.vae_patch_parallel import PatchStats
    from omni_runtime.stages.models.qwen_image.family import AutoencoderKLQwenImageKind
    from omni_runtime.stages.vae import VaeDecoderStage

    group = Mesh.build(ParallelSpec(vae_patch=world), rank, None, "cpu").group("vae_patch")
    out = []
    for dtype in (torch.float64, torch.float32):
        vae = _vae().to(dtype)
        stats = PatchStats()
        stage = VaeDecoderStage(vae, dtype, torch.device("cpu"), group=group, kind=AutoencoderKLQwenImageKind(),
                                stats=stats)
        for shape in shapes:
            stats.reset()
            z = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
            with torch.no_grad():
                got = stage.decode_latents(z)
                ref = vae.decode(z, return_dict=False)[0] if rank == 0 else None
            if ref is None:
                out.append({"none": got is None, "halo": stats.halo_exchanges})
                continue
            out.append({"dtype": str(dtype), "shape": list(got.shape), "ref_shape": list(ref.shape),
                        "halo": stats.halo_exchanges, "rel": float((got - ref).abs().max() / ref.abs().max()),
                        "spread": float(ref.std())})
    return out


@pytest.mark.timeout(120)
def test_patch_decode_equals_diffusers() -> None:
    shapes = [[1, 4, 1, 5, 6], [2, 4, 3, 5, 6]]  # one frame (an image), and 3 latent frames; 5 x 6 latent pixels
    results = run_workers(_exact_worker, 2, args=(shapes,), init_process_group=True, timeout=100)
    want_shapes = [[1, 3, 1, 40, 48], [2, 3, 9, 40, 48]]
    assert len(results[0]) == 4, results[0]
    for i, res in enumerate(results[0]):
        tol = 1e-9 if res["dtype"] == "torch.float64" else 1e-4
        assert res["shape"] == res["ref_shape"] == want_shapes[i % 2], res
        assert res["spread"] > 0.05, res  # the output is not constant: a wrong halo or cache would show
        assert res["rel"] <= tol, res
        assert res["halo"] > 0, res  # the split really ran
    assert all(r["none"] and r["halo"] > 0 for r in results[1]), results[1]


def test_a_decoder_with_other_classes_is_refused_by_name() -> None:
    """A module of a class the walk was not given (here Wan's up block inside Qwen-Image's decoder) is refused."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpBlock

    from omni_runtime.parallel.vae_patch_parallel import VaePatchError
    from omni_runtime.stages.models.qwen_image.family import AutoencoderKLQwenImageKind

    vae = _vae()
    AutoencoderKLQwenImageKind().check_patch(vae)
    vae.decoder.up_blocks[1] = WanUpBlock(8, 8, 1)
    with pytest.raises(VaePatchError, match="AutoencoderKLQwenImage does not support up block 1 of class WanUpBlock "
                                            r"\(only QwenImageUpBlock\).*patch = 1"):
        AutoencoderKLQwenImageKind().check_patch(vae)


BODY = {"prompt": "a red barn", "size": "32x32", "num_inference_steps": 2, "seed": 3}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vae_patch2_equals_diffusers_through_serve(tmp_path) -> None:
    server = Server(tmp_path, base_config="qwen_image.toml",
                    edits={"[stages.vae.parallel]\npatch = 1": "[stages.vae.parallel]\npatch = 2"})
    try:
        r = httpx.post(server.url + "/v1/images/generations", json=BODY, headers=server.headers, timeout=200)
        assert r.status_code == 200, (r.text, server.log_text()[-3000:])
        ours = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
        log = server.log_text()
        assert "vae[0] rank 1/2" in log, log[-3000:]  # the second VAE rank really ran
        assert "decoding on the driver alone" not in log  # and the split decode, not the few-rows fallback
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()
        assert server.shm_entries() == []

    from diffusers import QwenImagePipeline

    from omni_runtime.runtime.model_store import ensure_model

    pipe = QwenImagePipeline.from_pretrained(str(ensure_model(str(ROOT / "models" / "tiny-qwen-image"))),
                                             dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ref = np.asarray(pipe(prompt=BODY["prompt"], width=32, height=32, num_inference_steps=2, true_cfg_scale=1.0,
                          generator=torch.Generator("cpu").manual_seed(3), output_type="pil").images[0])
    assert ours.shape == ref.shape == (32, 32, 3)
    assert ours.std() > 5  # a real image, not a constant
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2
