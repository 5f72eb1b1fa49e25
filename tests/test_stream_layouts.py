"""Streamed partial images under a parallel denoiser layout (configs/cfg2.toml: CFG parallel over 2 ranks) through
``serve``: the driver rank sends the previews, the other rank computes and drops its own; a true-CFG request (one row
per rank) streams its partials and a completed image equal to the same request without streaming."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from image_bytes import decode_b64
from test_server_harness import Server

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]

BODY = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "true_cfg_scale": 4.0, "size": "64x64",
        "seed": 5, "num_inference_steps": 6}


def test_cfg2_streams_partials_and_the_same_final_image(tmp_path) -> None:
    server = Server(tmp_path, base_config="cfg2.toml")
    try:
        events = []
        with httpx.stream("POST", server.url + "/v1/images/generations", headers=server.headers, timeout=120,
                          json={**BODY, "stream": True, "partial_images": 2}) as r:
            assert r.status_code == 200, r.read()
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert [e["type"] for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        plain = httpx.post(server.url + "/v1/images/generations", json=BODY, headers=server.headers, timeout=120)
        assert plain.status_code == 200, plain.text
        final = decode_b64(events[-1]["b64_json"])
        assert int(np.abs(final.astype(int) - decode_b64(plain.json()["data"][0]["b64_json"]).astype(int)).max()) <= 2
        assert int(np.abs(final.astype(int) - decode_b64(events[0]["b64_json"]).astype(int)).max()) > 2
        assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    finally:
        server.stop()
    assert server.shm_entries() == []
