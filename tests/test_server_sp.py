"""A denoiser replica of 2 ranks (Ulysses 2), through ``serve``, returns the in-process (Omni(in_process=True)) image."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from stage_refs import single_rank_config
from test_server_harness import Server

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]


@pytest.mark.parametrize("config", ["sp2.toml"])
def test_ulysses2_serve_matches_in_process_pipeline(tmp_path, config):
    from omni_runtime.runtime import Omni

    server = Server(tmp_path, base_config=config)
    try:
        titles = sorted(" ".join(p.cmdline()).strip() for p in server.stage_procs())
        assert titles == ["omni-runtime: denoiser[0] rank 0/2", "omni-runtime: denoiser[0] rank 1/2",
                          "omni-runtime: text_encoder[0] rank 0/1", "omni-runtime: vae[0] rank 0/1"]
        body = {"prompt": "a castle on a hill", "seed": 21, "size": "64x64", "num_inference_steps": 3}
        r = httpx.post(server.url + "/v1/images/generations", json=body,
                       headers=server.headers, timeout=120)
        assert r.status_code == 200, r.text
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
        log = server.log_text()
        assert "denoiser[0] rank 1/2" in log  # the follower rank logs with its prefix
        assert "sequence parallel over 2 ranks" in log  # the denoiser really sharded (stages logs it)
    finally:
        server.stop()
    assert server.shm_entries() == []
    with Omni(single_rank_config(server.config_path), in_process=True) as omni:
        ref = np.asarray(omni.generate("a castle on a hill", seed=21, size="64x64", num_inference_steps=3)[0])
    diff = np.abs(served.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
