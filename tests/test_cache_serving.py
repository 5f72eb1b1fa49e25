"""Cache acceleration through ``serve`` (issue 26): a cached request (true CFG, so each branch keeps its own state)
under each accepted layout (sp2: Ulysses 2, the L1 sums all-reduced over the sp group; cfg2: each branch on its own
cfg rank; hsdp2: sharded weights, replicated compute) returns the image and the ``cache`` counters the same cached
request returns on the default layout (max |delta| <= 1/255; the counters equal, so every rank decided alike);
some steps are skipped, and the cached image differs from the uncached one. A bad ``cache`` is a 400 naming the
field with the allowed range, the server still serves, and ``/metrics`` counts the cached steps."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from test_server_harness import Server

pytestmark = [pytest.mark.slow]

CACHE = {"method": "first_block", "threshold": 0.3}
BODY = {"prompt": "a castle on a hill", "negative_prompt": "blurry", "true_cfg_scale": 3.0, "size": "64x64",
        "num_inference_steps": 8, "seed": 11}


def _post(server: Server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/images/generations", json=body, headers=server.headers, timeout=300)


def _image(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(resp.json()["data"][0]["b64_json"])))).astype(int)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("cache_default"))
    try:
        cached = _post(server, {**BODY, "cache": CACHE})
        plain = _post(server, BODY)
        bad = _post(server, {**BODY, "cache": {"method": "first_block", "threshold": 5}})
        after = _post(server, {**BODY, "num_inference_steps": 2})
        metrics = httpx.get(server.url + "/metrics", headers=server.headers).text
    finally:
        server.stop()
    assert server.shm_entries() == []
    return cached, plain, bad, after, metrics


def test_default_layout_caches(default_run):
    cached, plain, bad, after, metrics = default_run
    stats = cached.json()["cache"]
    assert stats["method"] == "first_block" and stats["steps"] == 2 * BODY["num_inference_steps"]
    assert 0 < stats["cached_steps"] < stats["steps"] and stats["cached_blocks"] > 0
    assert "cache" not in plain.json()
    assert np.abs(_image(cached) - _image(plain)).max() > 0  # skipping changed something
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache"
    assert "cache.threshold=5: must be a number from 0 to 1" in bad.json()["error"]["message"]
    assert after.status_code == 200
    assert f'omni_cache_steps_total{{method="first_block",outcome="cached"}} {float(stats["cached_steps"])}' \
        in metrics


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["sp2.toml", "cfg2.toml", "hsdp2.toml"])
def test_layout_equals_default(tmp_path, default_run, config):
    server = Server(tmp_path, base_config=config)
    try:
        resp = _post(server, {**BODY, "cache": CACHE})
    finally:
        server.stop()
    assert server.shm_entries() == []
    ref = default_run[0]
    assert resp.json()["cache"] == ref.json()["cache"]
    assert np.abs(_image(resp) - _image(ref)).max() <= 1
