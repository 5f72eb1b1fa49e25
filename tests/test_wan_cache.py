"""Cache acceleration (issue 26's ``cache`` field) for Wan videos.

In process (``Omni(in_process=True)``, the engines ``serve`` runs): First-Block Cache on the tiny Wan equals diffusers'
``WanPipeline`` with ``apply_first_block_cache`` (diffusers.hooks), with CFG (each branch its own state, diffusers'
``cache_context("cond" / "uncond")``): the number of skipped (step, branch) forwards and the frames (<= 2/255), at a
threshold where decisions go both ways (6 of 12 skipped, computing again after cached steps); threshold 0 returns
the uncached frames bit for bit; DBCache with ``fn = 1, bn = 0`` is First-Block Cache; TeaCache is refused naming
the field and why.

Through ``serve`` (one server, ``configs/wan.toml``): a JSON and a multipart ``POST /v1/videos`` with ``cache`` return
diffusers' frames and the skipped counts in the video object; malformed ``cache`` values (JSON or form) are 400s
naming the field, one the model cannot run (TeaCache) fails its job naming it (the denoiser checks it), and the
server stays healthy. 32x32, 5 frames, 6 steps.
"""

from __future__ import annotations

import json

import httpx
import msgspec
import numpy as np
import pytest
import torch
from stage_refs import diffusers_pipeline, first_block_cache_skips
from test_server_harness import ROOT, Server

from omni_runtime.runtime.video_files import decode_frames

THRESHOLD = 0.1
BODY = {"prompt": "a dog on a beach", "negative_prompt": "blurry", "size": "32x32", "num_frames": 5,
        "num_inference_steps": 6, "guidance_scale": 4.0, "seed": 11}
FBC = {"method": "first_block", "threshold": THRESHOLD}


@pytest.fixture(scope="module")
def diffusers_fbc() -> tuple[np.ndarray, int]:
    """``WanPipeline`` with diffusers' First-Block Cache on the embedded tiny Wan: its frames in [0, 1] and how many
    (step, branch) forwards skipped the remaining blocks."""
    pipe = diffusers_pipeline("WanPipeline", ROOT / "models" / "tiny-wan", dtype=None)
    skipped = first_block_cache_skips(pipe.transformer, pipe.transformer.blocks[0], THRESHOLD)
    frames = pipe(prompt=BODY["prompt"], negative_prompt=BODY["negative_prompt"], height=32, width=32, num_frames=5,
                  num_inference_steps=6, guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(11),
                  output_type="np").frames[0]
    assert len(skipped) == 12 and 0 < sum(skipped) < 11, skipped  # decisions go both ways: the test can fail
    return np.asarray(frames), sum(skipped)


def _max_levels(frames: np.ndarray, ref: np.ndarray) -> float:
    assert frames.shape == ref.shape == (5, 32, 32, 3), (frames.shape, ref.shape)
    return float(np.abs(frames / 255.0 - ref).max() * 255)


@pytest.mark.slow
def test_wan_first_block_equals_diffusers_in_process(diffusers_fbc) -> None:
    from omni_runtime.runtime import Omni
    from omni_runtime.runtime.config_load import config_from_dict
    from omni_runtime.runtime.orchestrator import BadRequestInStage
    from omni_runtime.runtime.requests import RequestError
    from omni_runtime.runtime.video_offline import parse_video
    from omni_runtime.stages.cache_config import CacheConfig

    ref, ref_skipped = diffusers_fbc
    cfg = config_from_dict({"model": {"path": str(ROOT / "models" / "tiny-wan")}})
    with Omni(cfg, in_process=True) as omni:
        def run(cache: dict | None) -> tuple[np.ndarray, dict]:
            report: dict = {}
            vr = parse_video({**BODY, **({"cache": cache} if cache else {})}, cfg)
            return decode_frames(omni.generate_encoded(vr.req, report)[0]), report.get("cache", {})

        cached, stats = run(FBC)
        plain, no_stats = run(None)
        zero, zero_stats = run({"method": "first_block", "threshold": 0.0})
        db, db_stats = run({"method": "dbcache", "threshold": THRESHOLD, "fn": 1, "bn": 0})
        with pytest.raises(RequestError, match=r"cache.method='teacache': the wan family has no TeaCache here: "
                                          r"diffusers implements none for Wan.*allowed: first_block, dbcache"):
            run({"method": "teacache", "threshold": 0.3})  # the edge (WanFamily.cache_refusals)
        teacache = msgspec.structs.replace(parse_video(BODY, cfg).req, cache=CacheConfig("teacache", 0.3))
        with pytest.raises(BadRequestInStage, match=r"cache.method='teacache': the wan family has no TeaCache here: "
                                               r"diffusers implements none for Wan.*allowed: first_block, dbcache"):
            omni.generate_encoded(teacache)  # the denoiser's own check behind the edge
        with pytest.raises(BadRequestInStage, match=r"cache.fn \+ cache.bn = 1 \+ 1 = 2: must be less than the model's 2"):
            run({"method": "dbcache", "fn": 1, "bn": 1})
    assert stats == {"method": "first_block", "steps": 12, "cached_steps": ref_skipped, "blocks": 24,
                     "cached_blocks": ref_skipped}, stats
    assert _max_levels(cached, ref) <= 2
    assert np.abs(cached.astype(int) - plain.astype(int)).max() > 0  # the skipped steps changed the video
    assert no_stats == {}
    assert zero_stats["cached_steps"] == 0 and np.array_equal(zero, plain)  # threshold 0: the uncached frames
    assert db_stats["cached_steps"] == ref_skipped and np.array_equal(db, cached)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wan_cache_through_serve(tmp_path, diffusers_fbc) -> None:
    ref, ref_skipped = diffusers_fbc
    server = Server(tmp_path, base_config="wan.toml")
    try:
        headers = {k: v for k, v in server.headers.items() if k.lower() != "content-type"}
        posts = [httpx.post(server.url + "/v1/videos", json={**BODY, "cache": FBC}, headers=server.headers,
                            timeout=60),
                 httpx.post(server.url + "/v1/videos", headers=headers, timeout=60,
                            files={k: (None, json.dumps(v) if k == "cache" else str(v))
                                   for k, v in {**BODY, "cache": FBC}.items()})]
        for r in posts:
            assert r.status_code == 200, r.text
            job = server.finished_video(r.json()["id"])
            assert job["cache"] == {"method": "first_block", "steps": 12, "cached_steps": ref_skipped, "blocks": 24,
                                    "cached_blocks": ref_skipped}, job
            frames = decode_frames(httpx.get(f"{server.url}/v1/videos/{job['id']}/content",
                                             params={"variant": "frames"}, headers=server.headers).content)
            assert _max_levels(frames, ref) <= 2
        for bad, needle in (({"method": "teacache"}, "cache.method='teacache'"),
                            ({"method": "magic"}, "cache.method='magic'"),
                            ({"method": "first_block", "threshold": 2}, "cache.threshold=2"),
                            ("first_block", "cache: must be an object")):
            r = httpx.post(server.url + "/v1/videos", json={**BODY, "cache": bad}, headers=server.headers, timeout=60)
            # teacache: well-formed, refused at the edge from the family's declaration (WanFamily.cache_refusals)
            assert r.status_code == 400 and needle in r.text, (r.status_code, r.text)
        r = httpx.post(server.url + "/v1/videos", headers=headers, timeout=60,
                       files={**{k: (None, str(v)) for k, v in BODY.items()}, "cache": (None, "{not json")})
        assert r.status_code == 400 and "cache" in r.text, r.text
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()
        assert server.shm_entries() == []
