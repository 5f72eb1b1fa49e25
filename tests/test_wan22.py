"""Wan 2.2's two experts in process (the embedded ``tiny-wan22``: ``transformer`` and ``transformer_2`` with other
weights, ``boundary_ratio`` 0.875; with 4 steps step 0 runs ``transformer``, steps 1-3 ``transformer_2``): the
pipeline against diffusers' ``WanPipeline`` (with transformer_2 and boundary_ratio) on the same directory and seed
(<= 2/255) with and without ``guidance_scale_2``; two requests at steps of different experts in one running-set step,
each with its own guidance scale; the checkpoint variants refused by name; ``guidance_scale_2`` at the video edge,
the CLI flag, a batch line and ``Omni.generate_video``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from model_dirs import model_copy, with_unipc_scheduler
from test_server_harness import ROOT

from omni_runtime.runtime.requests import GenerationRequest, RequestError
from omni_runtime.stages.engine import StageItem, load_engine
from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.errors import RequestError as StageRequestError
from omni_runtime.stages.models.family import family_of

H, W, FRAMES, STEPS = 32, 32, 5, 4


@pytest.fixture(scope="module")
def wan22_dir():
    from omni_runtime.runtime.model_store import ensure_model

    return ensure_model(str(ROOT / "models" / "tiny-wan22"))


@pytest.fixture(scope="module")
def pipe(wan22_dir):
    from diffusers import WanPipeline

    p = WanPipeline.from_pretrained(str(wan22_dir))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def engines(wan22_dir):
    return tuple(load_engine(s, wan22_dir, "float32", "cpu") for s in ("text_encoder", "denoiser", "vae"))


def _reference(pipe, prompt: str, seed: int, guidance_2: float | None = None, output_type: str = "np"):
    out = pipe(prompt=prompt, negative_prompt="", height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS,
               guidance_scale=5.0, guidance_scale_2=guidance_2, generator=torch.Generator("cpu").manual_seed(seed),
               output_type=output_type).frames
    return out[0] if output_type == "np" else out


def _latents(packed: torch.Tensor) -> torch.Tensor:
    """Packed denoiser latents (tokens, C*4) -> WanPipeline's output_type='latent' layout (1, C, F, h, w)."""
    from omni_runtime.stages.latents import unpack_video_latents

    return unpack_video_latents(packed[None], (FRAMES - 1) // 4 + 1, H, W, 8)


def _req(prompt: str, seed: int, guidance_2: float | None = None, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, negative_prompt="", width=W, height=H, num_inference_steps=STEPS,
                             true_cfg_scale=5.0, seed=seed, num_frames=FRAMES, true_cfg_scale_2=guidance_2, **kw)


def _encode(te, req: GenerationRequest) -> StageItem:
    item = StageItem(req, req.seed)
    item.inputs = te.step([item])[0]
    return item


def test_the_schedule_is_declared(wan22_dir, engines) -> None:
    family = family_of(wan22_dir)
    schedule = family.expert_schedule(wan22_dir)
    assert schedule.slots == ("transformer", "transformer_2") and schedule.boundary == 875.0
    assert [schedule.expert(t) for t in (1000.0, 875.0, 857.7, 8.9)] == [0, 0, 1, 1]
    assert "guidance_scale_2" in "\n".join(family.describe())
    from omni_runtime.stages.model_check import check_model_dir

    assert "transformer_2: WanTransformer3DModel, 69 tensors" in check_model_dir(wan22_dir)
    dn = engines[1].stage
    assert len(dn.models) == 2 and dn.models[0] is dn.model
    a, b = (dict(m.named_parameters())["proj_out.weight"] for m in dn.models)
    assert not torch.equal(a, b)  # two experts, other weights


def test_pipeline_equals_diffusers(engines, pipe) -> None:
    """The default layout in process equals WanPipeline with both experts: the frames within 2/255, the latents
    within 1e-4; guidance_scale_2 changes the latents by far more than that (the tiny model's text moves the pixels
    little) and transformer_2 the frames by far more than 2/255, so a wrong scale or expert would be caught.
    guidance_scale_2 absent: transformer_2's steps take guidance_scale (explicit scales: the next test)."""
    te, dn, va = engines
    guidance_2 = None
    item = _encode(te, _req("a cat walking", 3, guidance_2))
    latents = dn.step([item])[0]
    item.inputs = latents
    got = va.step([item])[0]
    ref = _reference(pipe, "a cat walking", 3, guidance_2=guidance_2)
    assert got.shape == ref.shape == (FRAMES, H, W, 3)
    assert np.abs(got / 255.0 - ref).max() <= 2 / 255
    ref_latents = _reference(pipe, "a cat walking", 3, guidance_2=guidance_2, output_type="latent")
    torch.testing.assert_close(_latents(latents), ref_latents, atol=1e-4, rtol=0)
    other = _reference(pipe, "a cat walking", 3, guidance_2=1.0, output_type="latent")
    assert (_latents(latents) - other).abs().max() > 3e-3  # guidance_scale_2 matters
    ratio = pipe.config.boundary_ratio
    pipe.register_to_config(boundary_ratio=None)  # transformer alone
    try:
        one = _reference(pipe, "a cat walking", 3, output_type="latent")
    finally:
        pipe.register_to_config(boundary_ratio=ratio)
    assert (_latents(latents) - one).abs().max() > 0.5  # transformer_2 matters (9/255 on the frames)


def test_rows_at_steps_of_different_experts_share_a_step(engines, pipe) -> None:
    """The first request is at step 1 (transformer_2) when the second joins at step 0 (transformer): that step runs
    each expert once on its own rows, each request with its own guidance_scale_2; both equal WanPipeline."""
    te, dn, _ = engines
    reqs = [_req("a cat", 3, 1.0), _req("a dog", 4, 9.0)]
    items = [_encode(te, r) for r in reqs]
    calls = [0, 0]
    hooks = [m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, m in enumerate(dn.stage.models)]
    try:
        dn.admit(0, items[0])
        assert dn.run_step() == {} and calls == [1, 0]
        dn.admit(1, items[1])
        done = dn.run_step()
        assert calls == [2, 1]  # one forward of each expert in the mixed step
        while len(done) < 2:
            done.update(dn.run_step())
    finally:
        for h in hooks:
            h.remove()
    for slot, req in enumerate(reqs):
        ref = _reference(pipe, req.prompt, req.seed, guidance_2=req.true_cfg_scale_2, output_type="latent")
        torch.testing.assert_close(_latents(done[slot]), ref, atol=1e-4, rtol=0)


def test_what_two_experts_do_not_serve_is_refused_by_name(engines) -> None:
    from omni_runtime.runtime.requests import LoraRef
    from omni_runtime.stages.cache_config import CacheConfig

    te, dn, _ = engines
    item = _encode(te, _req("a cat", 1, lora=(LoraRef(name="a", path="/nonexistent.safetensors", version=0,
                                                            scale=1.0),)))
    with pytest.raises(StageRequestError, match="lora: .* 2 experts"):
        dn.admit(5, item)
    item = _encode(te, _req("a cat", 1, cache=CacheConfig(method="first_block")))
    with pytest.raises(StageRequestError, match="cache.method='first_block'.* 2 experts"):
        dn.admit(6, item)
    assert len(dn.running) == 0


@pytest.mark.parametrize(("edit", "words"), [
    ({"transformer_2": [None, None]}, "needs both"),  # boundary_ratio without transformer_2
    ({"boundary_ratio": None}, "needs both"),  # transformer_2 without boundary_ratio
    ({"boundary_ratio": 1.5}, r"boundary_ratio in \(0, 1\]"),
    ({"boundary_ratio": "0.9"}, r"boundary_ratio in \(0, 1\]"),
    ({"transformer_2": ["diffusers", "FluxTransformer2DModel"]}, "is not supported"),
    ({"expand_timesteps": True}, "TI2V's per-token timesteps"),
])
def test_checkpoint_variants_are_refused_by_name(wan22_dir, tmp_path, edit, words) -> None:
    from omni_runtime.stages.model_check import check_model_dir

    model = model_copy(wan22_dir, tmp_path / "model", edit)
    with pytest.raises(CheckpointError, match=words):
        check_model_dir(model)
    with pytest.raises(CheckpointError, match=words):
        family_of(model).expert_schedule(model)
    assert check_model_dir(wan22_dir)


def test_experts_of_other_configs_are_refused(wan22_dir, tmp_path) -> None:
    from omni_runtime.stages.denoiser import DenoiserStage

    model = tmp_path / "model"
    shutil.copytree(wan22_dir, model)
    config = json.loads((model / "transformer_2" / "config.json").read_text())
    (model / "transformer_2" / "config.json").write_text(json.dumps({**config, "num_layers": 1}))
    with pytest.raises(CheckpointError, match=r"transformer_2/config.json differs .* \['num_layers'\]"):
        DenoiserStage.from_pretrained(model)
    shutil.rmtree(model / "transformer_2")
    with pytest.raises(CheckpointError, match="second expert of this two-expert Wan 2.2 checkpoint is missing"):
        DenoiserStage.from_pretrained(model)


def test_guidance_scale_2_at_the_edge(wan22_dir) -> None:
    """Accepted for a two-expert model (JSON and multipart strings), checked like guidance_scale, refused for one."""
    from omni_runtime.runtime.video_request import VideoModel, parse_video_request, video_model

    two = video_model(str(wan22_dir))
    assert two.experts == 2
    caps = {"default_fps": 16, "max_frames": 129, "max_work": 2**40}
    body = {"prompt": "a cat", "num_frames": 5, "size": "32x32", "guidance_scale": 4.0}
    assert parse_video_request(body, two, **caps).req.true_cfg_scale_2 is None
    assert parse_video_request({**body, "guidance_scale_2": 2.5}, two, **caps).req.true_cfg_scale_2 == 2.5
    form = {k: str(v) for k, v in {**body, "guidance_scale_2": 0.5}.items()}
    assert parse_video_request(form, two, form=True, **caps).req.true_cfg_scale_2 == 0.5
    for bad in (-1, "abc", 1e9, True, [2]):
        with pytest.raises(RequestError, match="guidance_scale_2") as e:
            parse_video_request({**body, "guidance_scale_2": bad}, two, **caps)
        assert e.value.param == "guidance_scale_2"
    one = VideoModel("wan", True, 4, experts=1)
    with pytest.raises(RequestError, match="guidance_scale_2: only two-expert"):
        parse_video_request({**body, "guidance_scale_2": 2.0}, one, **caps)


def test_cli_flag_and_batch_line(tmp_path) -> None:
    from omni_runtime.runtime.cli import build_parser
    from omni_runtime.runtime.config_load import load_config
    from omni_runtime.runtime.offline import read_prompts
    from omni_runtime.runtime.video_offline import is_video_output, parse_video, video_request_from_args

    cfg = load_config(ROOT / "configs" / "wan22.toml")
    args = build_parser().parse_args(["generate", "--config", "x.toml", "--prompt", "a cat", "--size", "32x32",
                                      "--num-frames", "5", "--guidance-scale-2", "2.5", "-o", "out.png"])
    assert is_video_output(args)
    assert video_request_from_args(args, cfg).req.true_cfg_scale_2 == 2.5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--config", "x.toml", "--prompt", "a", "-o", "o.mp4",
                                   "--guidance-scale-2", "abc"])
    lines = tmp_path / "p.jsonl"
    lines.write_text(json.dumps({"prompt": "a cat", "num_frames": 5, "size": "32x32", "guidance_scale_2": 3.0}) + "\n")
    from omni_runtime.runtime.requests import WorkCaps

    (_, vr), = read_prompts(lines, WorkCaps.from_config(cfg), cfg, video=lambda raw: parse_video(raw, cfg))
    assert vr.req.true_cfg_scale_2 == 3.0


def test_omni_generate_video_equals_diffusers(pipe) -> None:
    from omni_runtime.runtime.config_load import load_config
    from omni_runtime.runtime.omni import Omni

    cfg = load_config(ROOT / "configs" / "wan22.toml")
    with Omni(cfg, in_process=True) as omni:
        got = omni.generate_video("a cat walking", negative_prompt="", size=f"{W}x{H}", num_frames=FRAMES,
                                  num_inference_steps=STEPS, guidance_scale=5.0, guidance_scale_2=2.0, seed=3)
    ref = _reference(pipe, "a cat walking", 3, guidance_2=2.0)
    assert np.abs(got / 255.0 - ref).max() <= 2 / 255


def test_unipc_checkpoint_equals_diffusers(wan22_dir, tmp_path) -> None:
    """Wan 2.2's real checkpoints ship UniPCMultistepScheduler (integer timesteps 999, 937, 857, ...: the expert
    switches after the second of 6 steps): each request's own diffusers solver, the latents within 1e-4."""
    from diffusers import WanPipeline

    model = with_unipc_scheduler(model_copy(wan22_dir, tmp_path / "model"))
    te, dn = (load_engine(s, model, "float32", "cpu") for s in ("text_encoder", "denoiser"))
    req = GenerationRequest(prompt="a cat", negative_prompt="", width=W, height=H, num_inference_steps=6,
                            true_cfg_scale=5.0, seed=3, num_frames=FRAMES, true_cfg_scale_2=2.0)
    item = _encode(te, req)
    latents = dn.step([item])[0]
    pipe = WanPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt="a cat", negative_prompt="", height=H, width=W, num_frames=FRAMES, num_inference_steps=6,
               guidance_scale=5.0, guidance_scale_2=2.0, generator=torch.Generator("cpu").manual_seed(3),
               output_type="latent").frames
    torch.testing.assert_close(_latents(latents), ref, atol=1e-4, rtol=0)
