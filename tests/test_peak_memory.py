"""``peak_memory_mb``: each stage's peak memory per request, in the images response and as a Prometheus metric.

Through ``serve`` (one server for the module): the field is present with a positive number for every stage, the
VAE's grows for a larger image (512x512 against 64x64: the VAE decodes 64x the pixels; the denoiser's does not
shrink), the metric counts every item. In process: the measurement itself (``runtime.peak_memory``) sees an allocation made
between its reset and its read, and forgets it after the next reset.
"""

from __future__ import annotations

import mmap

import httpx
import pytest

from omni_runtime.runtime.peak_memory import PeakMemory

STAGES = {"text_encoder", "denoiser", "vae"}


def test_the_high_water_mark_sees_a_peak_and_is_reset() -> None:
    mem = PeakMemory("cpu")
    if mem.method != "vmhwm":
        pytest.skip("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    mem.reset()
    base = mem.read_mb()
    # 64 MiB of fresh anonymous pages touched, then unmapped (a torch tensor could reuse pages this long-lived
    # process already holds resident from earlier tests: then its RSS, rightly, would not grow)
    block = mmap.mmap(-1, 64 * 2**20)
    for i in range(0, len(block), mmap.PAGESIZE):
        block[i] = 1
    block.close()
    peak = mem.read_mb()
    assert peak - base >= 60, (base, peak)
    mem.reset()
    assert mem.read_mb() < peak - 50  # the old peak is gone after a reset


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from test_server_harness import Server

    server = Server(tmp_path_factory.mktemp("peak_memory"))
    body = {"prompt": "a red cube", "num_inference_steps": 2, "seed": 3}
    try:
        small = httpx.post(server.url + "/v1/images/generations", json={**body, "size": "64x64"},
                           headers=server.headers, timeout=300)
        large = httpx.post(server.url + "/v1/images/generations", json={**body, "size": "512x512"},
                           headers=server.headers, timeout=300)
        metrics = httpx.get(server.url + "/metrics", headers=server.headers).text
    finally:
        server.stop()
    assert server.shm_entries() == []
    return small, large, metrics


def test_peak_memory_in_the_response_and_the_metric(served) -> None:
    small, large, metrics = served
    assert small.status_code == 200 and large.status_code == 200, (small.text, large.text)
    a, b = small.json()["peak_memory_mb"], large.json()["peak_memory_mb"]
    assert set(a) == STAGES and set(b) == STAGES, (a, b)
    assert all(isinstance(v, float) and v > 10 for v in (*a.values(), *b.values())), (a, b)  # a process's RSS
    # 512x512 decodes 64x the pixels of 64x64: the VAE's activations alone are tens of MB more
    assert b["vae"] > a["vae"] + 10, (a, b)
    # the tiny denoiser's extra activations for 1024 image tokens (against 16) may fit in pages its heap kept from
    # the first request: never less, though (the same process, the mark reset to the current RSS)
    assert b["denoiser"] >= a["denoiser"], (a, b)
    for stage in STAGES:
        assert f'omni_stage_peak_memory_mb_count{{stage="{stage}"}} 2.0' in metrics, metrics[-2000:]


def test_a_video_job_object_carries_the_field_once_stages_answered() -> None:
    from omni_runtime.runtime.video_jobs import VideoJob

    job = VideoJob(id="video_1", model="m", size="64x64", seconds="1", fps=8, num_frames=5)
    assert "peak_memory_mb" not in job.as_json(None)  # queued: no stage has answered yet
    job.report["peak_memory_mb"] = {"denoiser": 123.4}  # what Orchestrator.generate(report=job.report) fills
    assert job.as_json(None)["peak_memory_mb"] == {"denoiser": 123.4}
