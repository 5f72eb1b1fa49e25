"""``/v1/videos`` through ``serve`` (one server for the module, the tiny Wan model): the job lifecycle, the frames
equal to diffusers' ``WanPipeline`` on the same directory (<= 2/255), the mp4 within codec loss of them, multipart
and sync, DELETE mid-run, bad fields (400 naming the field, the server healthy after), the caps."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from test_server_harness import ROOT, Server

from omni_runtime.comm.instance import run_dir_path
from omni_runtime.runtime.video_files import decode_frames, decode_mp4

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = ROOT / "models" / "tiny-wan"
BODY = {"prompt": "a cat walking", "negative_prompt": "blurry", "size": "48x32", "num_frames": 5,
        "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 3}
CAPS = "\n".join(["max_frames = 129        # num_frames of one video at most",
                  "max_work = 2147483648   # width x height x num_frames x num_inference_steps of one video at most"])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("video"), base_config="wan.toml",
               edits={CAPS: "max_frames = 21\nmax_work = 2000000\npreviews = 2"})
    yield s
    run_dir = run_dir_path(s.instance)
    s.stop()
    assert s.shm_entries() == []
    assert not (run_dir / "videos").exists()  # the job files went with the server


def _wait(server: Server, vid: str, timeout: float = 120) -> list[dict]:
    seen = []
    end = time.time() + timeout
    while time.time() < end:
        r = httpx.get(f"{server.url}/v1/videos/{vid}", headers=server.headers)
        assert r.status_code == 200, r.text
        seen.append(r.json())
        if seen[-1]["status"] in ("completed", "failed"):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"video {vid} did not finish: {seen[-1]}")


def _content(server: Server, vid: str, variant: str) -> httpx.Response:
    return httpx.get(f"{server.url}/v1/videos/{vid}/content", params={"variant": variant}, headers=server.headers)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    import torch
    from diffusers import WanPipeline

    from omni_runtime.runtime.model_store import ensure_model

    pipe = WanPipeline.from_pretrained(str(ensure_model(str(MODEL))))
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=BODY["prompt"], negative_prompt=BODY["negative_prompt"], height=32, width=48, num_frames=5,
                num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3),
                output_type="np").frames[0]


@pytest.fixture(scope="module")
def completed(server) -> tuple[str, list[dict]]:
    r = httpx.post(f"{server.url}/v1/videos", json=BODY, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress") and job["model"] == "tiny-wan"
    assert job["size"] == "48x32" and job["seconds"] == "0.3125" and job["error"] is None
    return job["id"], _wait(server, job["id"])


def test_job_lifecycle_and_frames_equal_diffusers(server, completed, reference) -> None:
    vid, seen = completed
    assert seen[-1]["status"] == "completed" and seen[-1]["progress"] == 100 and seen[-1]["completed_at"]
    progress = [s["progress"] for s in seen]
    assert progress == sorted(progress)  # never goes back
    assert {s["status"] for s in seen} <= {"queued", "in_progress", "completed"}
    frames = decode_frames(_content(server, vid, "frames").content)
    assert frames.shape == reference.shape == (5, 32, 48, 3)
    assert np.abs(frames / 255.0 - reference).max() <= 2 / 255
    listed = httpx.get(f"{server.url}/v1/videos", headers=server.headers).json()
    assert listed["object"] == "list" and vid in [j["id"] for j in listed["data"]]
    # the request's denoising steps are what the progress counted
    steps = httpx.get(f"{server.url}/v1/requests/{vid}", headers=server.headers).json()
    assert steps["steps_done"] == steps["steps_total"] == 2


def test_mp4_and_thumbnail(server, completed) -> None:
    vid, _ = completed
    frames = decode_frames(_content(server, vid, "frames").content)
    r = _content(server, vid, "video")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    decoded = decode_mp4(r.content)
    assert decoded.shape == frames.shape
    mse = np.mean((decoded.astype(float) - frames.astype(float)) ** 2)
    assert 10 * np.log10(255**2 / max(mse, 1e-12)) >= 30  # PSNR within H.264's loss
    thumb = _content(server, vid, "thumbnail")
    assert thumb.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(thumb.content))), frames[0])


def test_multipart_and_sync_give_the_same_video(server, completed) -> None:
    vid, _ = completed
    frames = decode_frames(_content(server, vid, "frames").content)
    r = httpx.post(f"{server.url}/v1/videos", files={k: (None, str(v)) for k, v in BODY.items()},
                   headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    other = r.json()["id"]
    assert _wait(server, other)[-1]["status"] == "completed"
    assert np.array_equal(decode_frames(_content(server, other, "frames").content), frames)
    sync = httpx.post(f"{server.url}/v1/videos/sync", json=BODY, headers=server.headers, timeout=120)
    assert sync.status_code == 200 and sync.headers["content-type"] == "video/mp4"
    assert np.array_equal(decode_mp4(sync.content), decode_mp4(_content(server, vid, "video").content))
    assert httpx.delete(f"{server.url}/v1/videos/{other}", headers=server.headers).status_code == 200


def test_delete_mid_run_cancels_and_frees(server) -> None:
    body = {**BODY, "num_inference_steps": 60, "seed": 9}
    vid = httpx.post(f"{server.url}/v1/videos", json=body, headers=server.headers, timeout=60).json()["id"]
    end = time.time() + 60
    while httpx.get(f"{server.url}/v1/videos/{vid}", headers=server.headers).json()["progress"] < 2:
        assert time.time() < end, "the job never progressed"
        time.sleep(0.05)
    r = httpx.delete(f"{server.url}/v1/videos/{vid}", headers=server.headers)
    assert r.status_code == 200 and r.json() == {"id": vid, "object": "video.deleted", "deleted": True}
    assert httpx.get(f"{server.url}/v1/videos/{vid}", headers=server.headers).status_code == 404
    assert _content(server, vid, "video").status_code == 404
    status = httpx.get(f"{server.url}/v1/requests/{vid}", headers=server.headers).json()
    assert status["status"] == "cancelled" and status["steps_done"] < 60
    assert not (run_dir_path(server.instance) / "videos" / vid).exists()


def test_thumbnail_of_a_running_job_is_its_latest_preview(server) -> None:
    """With [video] previews = 2 a running job's thumbnail is the first frame of its latest preview (the denoiser's
    predicted clean latent decoded by the VAE); before the first preview it is a 409 that says so."""
    body = {**BODY, "num_inference_steps": 60, "seed": 11}
    vid = httpx.post(f"{server.url}/v1/videos", json=body, headers=server.headers, timeout=60).json()["id"]
    first = _content(server, vid, "thumbnail")
    if first.status_code == 409:
        assert "latest preview while it runs" in first.json()["error"]["message"]
    end = time.time() + 120
    while True:  # the first preview is taken after step 20 of 60 (partial_images = 2: steps 20 and 40)
        job = httpx.get(f"{server.url}/v1/videos/{vid}", headers=server.headers).json()
        assert job["status"] == "in_progress" or job["status"] == "queued", job
        r = _content(server, vid, "thumbnail")
        if r.status_code == 200:
            break
        assert r.status_code == 409 and time.time() < end, r.text
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/v1/videos/{vid}", headers=server.headers).json()["progress"] < 100
    thumb = np.asarray(Image.open(io.BytesIO(r.content)))
    assert thumb.shape == (32, 48, 3) and thumb.std() > 0
    assert httpx.delete(f"{server.url}/v1/videos/{vid}", headers=server.headers).status_code == 200


@pytest.mark.parametrize(("change", "param", "words"), [
    ({"size": "40x32"}, "size", "multiple of 16"),
    ({"num_frames": 6}, "num_frames", "4 k + 1 frames; nearest: 5 or 9"),
    ({"num_frames": 25}, "num_frames", "max_frames"),
    ({"seconds": 1}, "num_frames", "both given"),
    ({"guidance_scale": -1}, "guidance_scale", "between 0 and 100"),
    ({"guidance_scale_2": 3.0}, "guidance_scale_2", "two-expert"),
    ({"num_inference_steps": 0}, "num_inference_steps", "between 1 and 200"),
    ({"fps": 0}, "fps", "between 1 and 240"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"size": "512x512", "num_frames": 21}, "size", "max_work"),
    ({"input_reference": "x"}, "input_reference", "unknown field"),
])
def test_bad_fields_are_400_naming_the_field(server, change, param, words) -> None:
    r = httpx.post(f"{server.url}/v1/videos", json={**BODY, **change}, headers=server.headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_wrong_routes_and_variants(server, completed) -> None:
    vid, _ = completed
    r = _content(server, vid, "gif")
    assert r.status_code == 400 and "allowed values are video, thumbnail, frames" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/videos/nope", headers=server.headers).status_code == 404
    r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x"}, headers=server.headers)
    assert r.status_code == 400 and "/v1/videos" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/videos", content=b"{", headers={**server.headers,
                                                                     "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{server.url}/v1/videos", content=b"prompt=x", headers={
        **server.headers, "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert httpx.post(f"{server.url}/v1/videos", json=BODY).status_code == 401  # no API key
