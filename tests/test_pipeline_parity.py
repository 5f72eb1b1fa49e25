"""Our stages, and the runtime's in-process pipeline (``Omni(in_process=True)``: the stage engines behind the same
driver loop as the stage processes), equal diffusers' FluxPipeline for the same prompt, seed, steps and size.

Latents (diffusers ``output_type="latent"`` vs our denoiser output): relative max error <= 1e-4.
Images (uint8, through ``Omni(in_process=True)``, whose text encoder uses the served max_sequence_length 512):
max |delta| <= 1. For the tiny model of tools/make_tiny_model.py and for a second model with other dims, layer and
head counts, no guidance embedding and a static ``shift`` schedule, built here.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from PIL import Image
from stage_refs import decode, denoise_requests, load_stages  # noqa: E402

from omni_runtime.runtime.config_load import config_from_dict  # noqa: E402

LATENT_RTOL = 1e-4
IMAGE_ATOL = 1


@pytest.fixture(scope="module")
def other_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's encoders and VAE with a different transformer (3 heads of 24, 2+2 layers, no guidance
    embedding) and a static-shift scheduler."""
    pipe = FluxPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    torch.manual_seed(123)
    pipe.transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=24,
        num_attention_heads=3, joint_attention_dim=pipe.text_encoder_2.config.d_model,
        pooled_projection_dim=pipe.text_encoder.config.hidden_size, guidance_embeds=False,
        axes_dims_rope=(8, 8, 8),
    ).eval()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                     use_dynamic_shifting=False)
    out = tmp_path_factory.mktemp("other") / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


_cache: dict[tuple[str, str], object] = {}
_omnis: dict[str, object] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_omnis():
    yield
    for o in _omnis.values():
        o.close()
    _omnis.clear()


def _omni(path: Path):
    """The in-process runtime for ``path`` (one per model for the module)."""
    from omni_runtime.runtime import Omni

    if str(path) not in _omnis:
        _omnis[str(path)] = Omni(config_from_dict({"model": {"path": str(path)}}), in_process=True)
    return _omnis[str(path)]


def _load(path: Path):
    key = (str(path), "pair")
    if key not in _cache:
        ref = FluxPipeline.from_pretrained(path, dtype=torch.float32)
        ref.set_progress_bar_config(disable=True)
        _cache[key] = (ref, load_stages(path))
    return _cache[key]  # type: ignore[return-value]


def _reference(ref: FluxPipeline, seed: int, **kw) -> tuple[torch.Tensor, np.ndarray]:
    lat = ref(**kw, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    img = ref(**{**kw, "max_sequence_length": 512}, generator=torch.Generator("cpu").manual_seed(seed),
              output_type="np").images
    return lat, (img * 255).round().astype("uint8")


def _served(path: Path, prompt: str, seed: int, height: int, width: int, steps: int, **kw) -> np.ndarray:
    fields = {k: v for k, v in kw.items() if k in ("negative_prompt", "true_cfg_scale", "guidance_scale")}
    return np.asarray(_omni(path).generate(prompt, seed=seed, size=f"{width}x{height}", num_inference_steps=steps,
                                           **fields)[0])


def _check(path: Path, *, prompt: str, seed: int, height: int, width: int, steps: int,
           negative_prompt: str | None = None, true_cfg_scale: float = 1.0, guidance_scale: float = 3.5,
           max_sequence_length: int = 512) -> None:
    ref, ours = _load(path)
    kw = dict(prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, height=height,
              width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
              max_sequence_length=max_sequence_length)
    ref_lat, ref_img = _reference(ref, seed, **kw)
    reqs = denoise_requests(ours, seed=seed, **kw)
    lat = torch.stack(ours.denoiser.denoise(reqs))
    assert lat.shape == ref_lat.shape
    rel = ((lat - ref_lat).abs().max() / ref_lat.abs().max()).item()
    assert rel <= LATENT_RTOL, f"latent relative error {rel:.3g} > {LATENT_RTOL}"
    image = _served(path, seed=seed, steps=steps, **{k: v for k, v in kw.items() if k != "num_inference_steps"})
    assert image.dtype == np.uint8 and image.shape == (height, width, 3)
    diff = np.abs(image.astype(np.int16) - ref_img[0].astype(np.int16)).max()
    assert diff <= IMAGE_ATOL, f"image max |delta| {diff} > {IMAGE_ATOL}"


@pytest.mark.parametrize(("height", "width"), [(256, 256), (192, 128)])
def test_tiny_model_matches_diffusers(tiny_dir: Path, height: int, width: int) -> None:
    _check(tiny_dir, prompt="a photo of a cat on the sofa", seed=7, height=height, width=width, steps=3)


def test_tiny_model_true_cfg_matches_diffusers(tiny_dir: Path) -> None:
    _check(tiny_dir, prompt="a dog in the snow", negative_prompt="blurry, low quality", true_cfg_scale=2.5,
           seed=11, height=128, width=192, steps=3, max_sequence_length=64)


def test_negative_prompt_without_true_cfg_is_ignored_as_in_diffusers(tiny_dir: Path) -> None:
    _check(tiny_dir, prompt="a dog in the snow", negative_prompt="blurry", true_cfg_scale=1.0,
           seed=3, height=128, width=128, steps=2, max_sequence_length=64)


@pytest.mark.parametrize(("height", "width", "cfg"), [(256, 256, 1.0), (144, 208, 3.0)])
def test_second_model_matches_diffusers(other_dir: Path, height: int, width: int, cfg: float) -> None:
    _check(other_dir, prompt="the lighthouse at dusk", negative_prompt="dark", true_cfg_scale=cfg, seed=5,
           height=height, width=width, steps=4, max_sequence_length=48)


def test_batch_of_three_equals_three_single_runs(tiny_dir: Path) -> None:
    """Three requests sent together batch in the in-process denoiser; each image equals its request run alone."""

    from omni_runtime.runtime.requests import parse_request

    _, ours = _load(tiny_dir)
    prompts = ["a cat", "the dog and the photo", "a red cube on a table"]
    seeds = [0, 1, 12345]
    kw = dict(height=128, width=160, num_inference_steps=3, max_sequence_length=64)
    batch_lat = ours.denoiser.denoise(denoise_requests(ours, prompts, seed=seeds, **kw))
    for p, s, lat_b in zip(prompts, seeds, batch_lat, strict=True):
        lat_1 = ours.denoiser.denoise(denoise_requests(ours, p, seed=s, **kw))[0]
        rel = ((lat_b - lat_1).abs().max() / lat_1.abs().max()).item()
        assert rel <= 1e-5, f"{p!r}: batched latents differ from the single run (rel {rel:.3g})"
    omni = _omni(tiny_dir)
    reqs = [parse_request({"prompt": p, "seed": s, "size": "160x128", "num_inference_steps": 3})
            for p, s in zip(prompts, seeds, strict=True)]
    futs = [omni.submit(r) for r in reqs]
    batch_img = [f.result(timeout=120)[0] for f in futs]
    text = omni._orch.metrics.render().decode()
    ones = float(re.search(r'omni_batch_size_bucket{le="1.0",stage="denoiser"} (\S+)', text).group(1))
    total = float(re.search(r'omni_batch_size_count{stage="denoiser"} (\S+)', text).group(1))
    assert ones < total  # at least one denoiser batch held more than one of them
    single_img = [omni.submit(r).result(timeout=120)[0] for r in reqs]
    for b, one in zip(batch_img, single_img, strict=True):
        a1, a2 = (np.asarray(Image.open(io.BytesIO(x))).astype(np.int16) for x in (b, one))
        assert np.abs(a1 - a2).max() <= 1
    # Different seeds/prompts really give different images (the batch is not one request repeated).
    imgs = [np.asarray(Image.open(io.BytesIO(x))).astype(np.int16) for x in batch_img]
    assert np.abs(imgs[0] - imgs[1]).max() > 10


def test_batch_with_mixed_sizes_and_cfg_matches_single_runs(tiny_dir: Path) -> None:
    """One call may mix request shapes: each shape group runs batched, results come back in request order."""
    _, ours = _load(tiny_dir)
    a = denoise_requests(ours, "a cat", seed=1, height=128, width=128, num_inference_steps=2, max_sequence_length=32)
    b = denoise_requests(ours, "a dog", seed=2, height=128, width=160, num_inference_steps=2, max_sequence_length=32,
                         negative_prompt="blur", true_cfg_scale=2.0)
    c = denoise_requests(ours, "a cube", seed=3, height=128, width=128, num_inference_steps=2,
                         max_sequence_length=32, guidance_scale=5.0)
    mixed = ours.denoiser.denoise(a + b + c)
    for got, single in zip(mixed, [a, b, c], strict=True):
        want = ours.denoiser.denoise(single)[0]
        assert got.shape == want.shape
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_bfloat16_matches_diffusers_bfloat16(tiny_dir: Path) -> None:
    ref = FluxPipeline.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    ref.set_progress_bar_config(disable=True)
    ours = load_stages(tiny_dir, dtype="bfloat16")
    kw = dict(prompt="a photo of a cat", height=128, width=128, num_inference_steps=2, max_sequence_length=32)
    ref_lat = ref(**kw, generator=torch.Generator("cpu").manual_seed(9), output_type="latent").images
    ref_img = ref(**kw, generator=torch.Generator("cpu").manual_seed(9), output_type="np").images
    lat = torch.stack(ours.denoiser.denoise(denoise_requests(ours, seed=9, **kw)))
    assert lat.dtype == torch.bfloat16
    rel = ((lat.float() - ref_lat.float()).abs().max() / ref_lat.float().abs().max()).item()
    assert rel <= 1e-2
    img = decode(ours, list(lat), 128, 128)[0]
    assert np.abs(img.astype(np.int16) - (ref_img[0] * 255).round().astype(np.int16)).max() <= 1
