"""Videos offline, in process (configs/wan.toml, the tiny Wan model): ``Omni.generate_video`` equals diffusers'
``WanPipeline``, ``omni-runtime generate --num-frames 5 -o out.mp4`` / ``out.zip`` write that video, ``batch`` writes
its video lines as mp4 and resumes; image requests to the video model are refused naming what to ask instead."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_server_harness import ROOT

from omni_runtime.runtime.config_load import load_config
from omni_runtime.runtime.requests import RequestError
from omni_runtime.runtime.video_files import decode_frames, decode_mp4

pytestmark = [pytest.mark.timeout(300)]

CONFIG = ROOT / "configs" / "wan.toml"
FIELDS = {"size": "48x32", "num_frames": 5, "num_inference_steps": 2, "seed": 3, "negative_prompt": "blurry",
          "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def omni():
    from omni_runtime.runtime.omni import Omni

    with Omni(CONFIG, in_process=True) as o:
        yield o


def test_generate_video_equals_diffusers(omni) -> None:
    import torch
    from diffusers import WanPipeline

    frames = omni.generate_video("a cat walking", **FIELDS)
    pipe = WanPipeline.from_pretrained(str(ROOT / "models" / "tiny-wan"))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt="a cat walking", negative_prompt="blurry", height=32, width=48, num_frames=5,
               num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3),
               output_type="np").frames[0]
    assert frames.shape == ref.shape == (5, 32, 48, 3)
    assert np.abs(frames / 255.0 - ref).max() <= 2 / 255
    with pytest.raises(RequestError, match="wan video model; ask for a video"):
        omni.generate("a cat")
    with pytest.raises(RequestError, match="num_frames=6: this model takes 4 k \\+ 1 frames"):
        omni.generate_video("a cat", num_frames=6)


def test_cli_generate_writes_mp4_and_frames(omni, tmp_path, capsys) -> None:
    from omni_runtime.runtime.cli import main

    expected = omni.generate_video("a cat walking", **FIELDS)
    common = ["generate", "--config", str(CONFIG), "--in-process", "--prompt", "a cat walking", "--size", "48x32",
              "--num-frames", "5", "--steps", "2", "--seed", "3", "--negative-prompt", "blurry", "--guidance", "5"]
    assert main([*common, "-o", str(tmp_path / "v.zip")]) == 0
    assert np.array_equal(decode_frames((tmp_path / "v.zip").read_bytes()), expected)
    assert main([*common, "--fps", "8", "-o", str(tmp_path / "v.mp4")]) == 0
    assert decode_mp4((tmp_path / "v.mp4").read_bytes()).shape == expected.shape
    assert "5 frames at 8 fps" in capsys.readouterr().out


def test_batch_writes_video_lines_and_resumes(omni, tmp_path) -> None:
    from omni_runtime.runtime.offline import run_batch

    cfg = load_config(CONFIG)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat walking", **FIELDS}) + "\n\n"
                       + json.dumps({"prompt": "a dog", "seconds": 0.5, "fps": 8, "size": "32x32",
                                     "num_inference_steps": 1, "seed": 1}) + "\n")
    stats = run_batch(cfg, prompts, tmp_path / "out", omni=omni)
    assert stats == {"total": 2, "skipped": 0, "generated": 2}
    first = decode_mp4((tmp_path / "out" / "00001.mp4").read_bytes())
    second = decode_mp4((tmp_path / "out" / "00003.mp4").read_bytes())
    assert first.shape == (5, 32, 48, 3) and second.shape == (1, 32, 32, 3)  # 0.5 s x 8 fps = 4 -> 1 frame
    assert run_batch(cfg, prompts, tmp_path / "out", omni=omni)["skipped"] == 2
    prompts.write_text(json.dumps({"prompt": "an image"}) + "\n")
    with pytest.raises(RequestError, match="line 1: the model is a wan video model"):
        run_batch(cfg, prompts, tmp_path / "out2", omni=omni)
    prompts.write_text(json.dumps({"prompt": "x", "num_frames": 501}) + "\n")
    with pytest.raises(RequestError, match=r"line 1: num_frames=501: at most 129 frames"):
        run_batch(cfg, prompts, tmp_path / "out3", omni=omni)
