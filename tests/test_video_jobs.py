"""The video edge without a server: the request table (seconds -> frames, the caps, an image model refused), the
bounded job store with its TTL and files, the ``[video]`` config keys, the frame files (zip, mp4)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.requests import RequestError
from omni_runtime.runtime.video_files import decode_frames, decode_mp4, encode_frames, encode_mp4
from omni_runtime.runtime.video_jobs import StoreFull, VideoJob, VideoJobStore
from omni_runtime.runtime.video_request import VideoModel, parse_video_request

WAN = VideoModel("wan", True, 4)
CAPS = {"default_fps": 16, "max_frames": 129, "max_work": 1 << 40}


def test_seconds_become_4k_plus_1_frames_and_guidance_becomes_cfg() -> None:
    vr = parse_video_request({"prompt": "x", "seconds": 2, "size": "64x32"}, WAN, **CAPS)
    assert vr.req.num_frames == 29 and vr.seconds == "2" and vr.fps == 16  # 32 frames -> 29
    assert vr.req.true_cfg_scale == 5.0 and vr.req.negative_prompt == ""  # WanPipeline's defaults
    assert (vr.req.width, vr.req.height) == (64, 32)
    vr = parse_video_request({"prompt": "x", "num_frames": 9, "fps": 8, "guidance_scale": 0.5}, WAN, **CAPS)
    assert vr.req.num_frames == 9 and vr.seconds == "1.125" and vr.req.true_cfg_scale == 1.0  # no CFG
    assert parse_video_request({"prompt": "x", "seconds": "1"}, WAN, **CAPS).req.num_frames == 13  # OpenAI's string
    form = parse_video_request({"prompt": "x", "num_frames": "9", "seed": "4"}, WAN, form=True, **CAPS)
    assert form.req.num_frames == 9 and form.req.seed == 4


@pytest.mark.parametrize(("raw", "param", "words"), [
    ({"prompt": "x", "seconds": 0.01}, "seconds", "no frame"),
    ({"prompt": "x", "seconds": "four"}, "seconds", "must be a number"),
    ({"prompt": "x", "num_frames": "9"}, "num_frames", "must be an integer"),  # JSON: a string is no integer
    ({"prompt": "x", "num_frames": 133}, "num_frames", "[video] max_frames"),
    ({"prompt": "x", "size": "832x480", "num_frames": 81, "num_inference_steps": 50}, "size", "[video] max_work"),
    ({"prompt": "x", "quality": "hd"}, "quality", "unknown field"),
])
def test_bad_requests_name_the_field(raw, param, words) -> None:
    with pytest.raises(RequestError) as e:
        parse_video_request(raw, WAN, **{**CAPS, "max_work": 10**9})
    assert e.value.param == param and words in str(e.value)


def test_an_image_model_refuses_videos() -> None:
    with pytest.raises(RequestError, match="flux model, which makes images; /v1/videos needs a video model"):
        parse_video_request({"prompt": "x"}, VideoModel("flux", False, 1), **CAPS)


def test_store_is_bounded_and_expires_with_its_files(tmp_path, monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("omni_runtime.runtime.video_jobs.time.monotonic", lambda: now[0])
    store = VideoJobStore(lambda: tmp_path / "run" / "videos", max_jobs=2, ttl_s=10)
    jobs = [VideoJob(id=f"video_{i}", model="m", size="16x16", seconds="1", fps=16, num_frames=17) for i in range(3)]
    store.add(jobs[0])
    store.add(jobs[1])
    with pytest.raises(StoreFull, match="max_jobs = 2"):
        store.add(jobs[2])
    store.dir(jobs[0]).mkdir()
    (store.dir(jobs[0]) / "video.mp4").write_bytes(b"x")
    store.finish(jobs[0], "completed")
    assert jobs[0].as_json(None)["progress"] == 100 and jobs[0].completed_at is not None
    assert jobs[1].as_json((3, 4))["progress"] == 75
    now[0] += 10
    assert store.get("video_0") is None and not (tmp_path / "run" / "videos" / "video_0").exists()
    store.add(jobs[2])  # room again
    asyncio.run(store.delete("video_1"))
    assert [j.id for j in store.list()] == ["video_2"]
    asyncio.run(store.close())
    assert store.list() == [] and not (tmp_path / "run" / "videos").exists()


@pytest.mark.parametrize(("key", "value", "words"), [
    ("max_frames", 0, "video.max_frames = 0"), ("max_jobs", 0, "video.max_jobs"), ("fps", 500, "video.fps = 500"),
    ("job_ttl_s", 0.0, "video.job_ttl_s"), ("max_work", "x", "video.max_work"), ("colour", 1, "colour"),
    ("previews", 4, "video.previews = 4: allowed: an integer from 0"), ("previews", -1, "video.previews"),
])
def test_video_config_keys_are_checked(key, value, words) -> None:
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        config_from_dict({"model": {"path": "m"}, "video": {key: value}})


def test_frames_zip_is_lossless_and_mp4_within_codec_loss() -> None:
    t, y, x = np.meshgrid(np.arange(5), np.arange(32), np.arange(48), indexing="ij")
    frames = np.stack([128 + 100 * np.sin((x + 3 * t) / 9), 128 + 100 * np.cos(y / 7), 60 + 3 * x + 0 * t],
                      axis=-1).astype(np.uint8)  # smooth moving colour (what H.264 is made for)
    assert np.array_equal(decode_frames(encode_frames(frames)), frames)
    decoded = decode_mp4(encode_mp4(frames, 16))
    assert decoded.shape == frames.shape
    mse = np.mean((decoded.astype(float) - frames.astype(float)) ** 2)
    assert 10 * np.log10(255**2 / mse) >= 30
