"""The Wan 2.1 family in process: the transformer, the text encoder and the whole pipeline (text encoder, denoiser,
VAE engines) against diffusers' own ``WanPipeline`` on the same tiny directory; video latent packing; the frame-count
rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_dirs import model_copy, with_unipc_scheduler

from omni_runtime.runtime.requests import GenerationRequest
from omni_runtime.stages.engine import StageItem, load_engine
from omni_runtime.stages.errors import RequestError
from omni_runtime.stages.latents import pack_latents, pack_video_latents, unpack_video_latents
from omni_runtime.stages.models.family import family_of

H, W, FRAMES, STEPS = 32, 48, 5, 2


@pytest.fixture(scope="module")
def engines(wan_tiny_dir):
    return tuple(load_engine(s, wan_tiny_dir, "float32", "cpu") for s in ("text_encoder", "denoiser", "vae"))


def _run(engines, req: GenerationRequest) -> np.ndarray:
    te, dn, va = engines
    item = StageItem(req, req.seed)
    item.inputs = te.step([item])[0]
    item.inputs = dn.step([item])[0]
    return va.step([item])[0]


def _reference(model_dir, **kw) -> np.ndarray:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(model_dir))
    seed = kw.pop("seed")
    return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).frames[0]


def test_family_is_declared(wan_tiny_dir):
    family = family_of(wan_tiny_dir)
    assert family.name == "wan" and family.video
    text = "\n".join(family.describe())
    assert "pipefusion" in text and "video tokens" in text  # refused by name, with the reason
    assert "not supported: vae_patch" not in text  # the causal 3D VAE splits exactly (tests/test_wan_vae_patch.py)
    assert "parallel modes: ulysses, ring, cfg, pp, hsdp_shard, vae_patch" in text


def test_video_packing_round_trips_and_one_frame_packs_like_an_image():
    x = torch.randn(2, 16, 3, 4, 6)
    packed = pack_video_latents(x)
    assert packed.shape == (2, 3 * 2 * 3, 64)
    assert torch.equal(unpack_video_latents(packed, 3, 32, 48, 8), x)
    assert torch.equal(pack_video_latents(x[:, :, :1]), pack_latents(x[:, :, 0]))


def test_transformer_equals_diffusers(wan_tiny_dir):
    from diffusers import WanTransformer3DModel

    from omni_runtime.stages.models.wan.transformer import WanTransformer, video_ids

    ref = WanTransformer3DModel.from_pretrained(wan_tiny_dir / "transformer").eval()
    ours = WanTransformer.from_pretrained(wan_tiny_dir)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 2, 4, 6, generator=gen)
    txt = torch.randn(2, 512, 32, generator=gen)
    t = torch.tensor([900.0, 500.0])
    with torch.no_grad():
        expected = ref(hidden_states=x, timestep=t, encoder_hidden_states=txt, return_dict=False)[0]
        got = ours(pack_video_latents(x), txt, t / 1000, video_ids(2, 2, 3))
    torch.testing.assert_close(got, pack_video_latents(expected), atol=1e-5, rtol=1e-5)


def test_text_encoder_equals_pipeline(wan_tiny_dir):
    from diffusers import WanPipeline

    from omni_runtime.stages.models.wan.text import WanTextEncoder

    pipe = WanPipeline.from_pretrained(str(wan_tiny_dir))
    with torch.no_grad():
        pos, neg = pipe.encode_prompt("a  cat &amp; dog", negative_prompt="blurry", max_sequence_length=512)
    got = WanTextEncoder.from_pretrained(wan_tiny_dir).encode(["a  cat &amp; dog", "blurry"])
    assert got[0]["prompt_embeds"].shape == (512, 32)
    torch.testing.assert_close(got[0]["prompt_embeds"], pos[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1]["prompt_embeds"], neg[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("frames", "cfg"), [(FRAMES, 5.0), (1, 1.0)])
def test_pipeline_equals_diffusers(engines, wan_tiny_dir, frames, cfg):
    """Every frame within 2/255 of WanPipeline's (output_type np) on the same directory and seed; with CFG (the
    negative prompt's branch) and without (guidance 1: one branch), a video and a single frame."""
    req = GenerationRequest(prompt="a cat walking", negative_prompt="", width=W, height=H, num_inference_steps=STEPS,
                            true_cfg_scale=cfg, seed=3, num_frames=frames)
    got = _run(engines, req)
    ref = _reference(wan_tiny_dir, prompt="a cat walking", negative_prompt="", height=H, width=W, num_frames=frames,
                     num_inference_steps=STEPS, guidance_scale=cfg, seed=3)
    assert got.shape == ref.shape == (frames, H, W, 3) and got.dtype == np.uint8
    assert np.abs(got / 255.0 - ref).max() <= 2 / 255
    assert got.std() > 0  # not a constant video


def test_frame_counts_are_checked(engines, tiny_dir):
    _, dn, _ = engines
    for bad in (0, 2, 6):
        req = GenerationRequest(prompt="x", width=W, height=H, num_inference_steps=1, num_frames=bad)
        with pytest.raises(RequestError, match=r"num_frames=.*4 k \+ 1"):
            dn.admit(7, StageItem(req, 0, dn_inputs(dn)))
    flux = load_engine("denoiser", tiny_dir, "float32", "cpu")
    req = GenerationRequest(prompt="x", width=64, height=64, num_inference_steps=1, num_frames=5)
    with pytest.raises(RequestError, match="num_frames=5: the flux family makes images; allowed: 1"):
        flux.stage.check_frames(req.num_frames)


def dn_inputs(dn) -> dict[str, torch.Tensor]:
    return {"prompt_embeds": torch.zeros(512, 32)}


@pytest.mark.parametrize(("edit", "words"), [
    ({"boundary_ratio": 0.875, "transformer_2": ["diffusers", "WanTransformer3DModel"]}, "two-expert Wan 2.2"),
    ({"expand_timesteps": True}, "TI2V's per-token timesteps"),
])
def test_wan22_variants_are_refused_by_name(wan_tiny_dir, tmp_path, edit, words):
    from omni_runtime.stages.errors import CheckpointError
    from omni_runtime.stages.model_check import check_model_dir

    model = model_copy(wan_tiny_dir, tmp_path / "model", edit)
    with pytest.raises(CheckpointError, match=words):
        check_model_dir(model)
    with pytest.raises(CheckpointError, match=words):
        family_of(model).load_transformer(model / "transformer", torch.float32, torch.device("cpu"))
    assert check_model_dir(wan_tiny_dir)  # the Wan 2.1 directory passes


def test_unipc_checkpoint_equals_diffusers(wan_tiny_dir, tmp_path):
    """Real Wan 2.1 checkpoints ship UniPCMultistepScheduler (a flow solver with per-request history): each
    request steps with its own instance of diffusers' class; 4 steps (the multistep corrector runs), two requests
    sharing the running set at different steps."""
    from omni_runtime.stages.engine import DenoiserEngine

    model = with_unipc_scheduler(model_copy(wan_tiny_dir, tmp_path / "model"))
    te, dn, va = (load_engine(s, model, "float32", "cpu") for s in ("text_encoder", "denoiser", "vae"))
    assert isinstance(dn, DenoiserEngine) and dn.stage.schedule.stepper is not None
    reqs = [GenerationRequest(prompt=p, negative_prompt="", width=W, height=H, num_inference_steps=4,
                              true_cfg_scale=5.0, seed=s, num_frames=FRAMES) for p, s in (("a cat", 3), ("a dog", 4))]
    items = [StageItem(r, r.seed) for r in reqs]
    for it, enc in zip(items, te.step(items), strict=True):
        it.inputs = enc
    dn.admit(0, items[0])
    dn.run_step()  # the first request is one step ahead when the second joins
    dn.admit(1, items[1])
    done: dict = {}
    while len(done) < 2:
        done.update(dn.run_step())
    for slot, (it, req) in enumerate(zip(items, reqs, strict=True)):
        it.inputs = done[slot]
        got = va.step([it])[0]
        ref = _reference(model, prompt=req.prompt, negative_prompt="", height=H, width=W, num_frames=FRAMES,
                         num_inference_steps=4, guidance_scale=5.0, seed=req.seed)
        assert np.abs(got / 255.0 - ref).max() <= 2 / 255
