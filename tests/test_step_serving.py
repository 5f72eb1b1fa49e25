"""Step-level continuous batching through ``omni-runtime serve`` (real processes, the official openai client):
fairness (a short request overtakes a long one that is running), mixed step counts and CFG in one running set,
cancellation by client disconnect. Every image equals the same request's solo run through the same server (uint8
within 1, i.e. 1/255).

The configs to run under: ``OMNI_STEP_TEST_CONFIGS`` (comma-separated file names in configs/, default
``default.toml,sp2.toml,cfg2.toml``: one rank, Ulysses 2 and CFG parallel 2). The other layouts run requests
that join a long request's running set at a step boundary in CI too (``test_server_harness.images_together``),
each against the default layout's images: pp2, pp2_usp2, pp2_cfg2 and pipefusion2 in ``test_server_pp.py``,
hsdp2, hsdp2x2 (with mixed sizes) and sp2_hsdp2 in ``test_hsdp.py``, sp2 and usp4 (Ulysses x Ring) in
``test_server_sp.py``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from test_server_harness import API_KEY, ROOT, Server, shared_steps

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]

CONFIGS = os.environ.get("OMNI_STEP_TEST_CONFIGS", "default.toml,sp2.toml,cfg2.toml").split(",")
# The long request's steps must outlast the short request's path through the text encoder and the VAE (about 3 s
# on a loaded 2-core machine, the same under every config) for 20 steps; a parallel denoiser makes each step
# faster, so the long request has more images there (its progress counts steps over all its images).
BIG = "512x512"


def step_config(tmp: Path, base: str, **denoiser: object) -> Path:
    """``configs/<base>`` with no work cap and the given ``[stages.denoiser]`` keys."""
    text = (ROOT / "configs" / base).read_text()
    text = text.replace("request_timeout_s = 600", "request_timeout_s = 600\nmax_pixels_steps = 0")
    keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in denoiser.items())
    assert "[stages.denoiser]\n" in text
    text = text.replace("[stages.denoiser]\n", "[stages.denoiser]\n" + keys, 1)
    path = tmp / f"step-{base}"
    path.write_text(text)
    return path


@pytest.fixture(scope="module", params=CONFIGS)
def server(request, tmp_path_factory):
    from omni_runtime.runtime.config_load import load_config

    tmp = tmp_path_factory.mktemp("step")
    path = step_config(tmp, request.param, scheduling="step")
    s = Server(tmp, base_config=str(path), timeout=300)
    s.denoiser_ranks = load_config(path).stages.denoiser.world_size
    yield s
    assert s.proc.poll() is None, "the server died during the module"
    s.stop()
    assert s.leftover == []  # the server was running, so stop() counted its stage processes


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=300, max_retries=0)


def _gen(server, body: dict, rid: str | None = None) -> np.ndarray:
    """The images of one request (stacked: n x H x W x 3)."""
    body = dict(body)
    prompt, size, n = body.pop("prompt"), body.pop("size"), body.pop("n", 1)
    out = _client(server).images.generate(model="tiny-flux", prompt=prompt, size=size, response_format="b64_json", n=n,
                                          extra_body=body, extra_headers={"X-Request-Id": rid} if rid else None)
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))).astype(np.int16)
                     for d in out.data])


def _progress(server, rid: str) -> dict:
    r = httpx.get(f"{server.url}/v1/requests/{rid}", headers=server.headers, timeout=10)
    return r.json() if r.status_code == 200 else {"status": "unknown", "steps_done": 0}


def _wait_running(server, rid: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while _progress(server, rid)["steps_done"] < 1:
        assert time.monotonic() < end, f"{rid} never started denoising"
        time.sleep(0.02)


def _in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["out"] = fn(*args)
        except BaseException as e:  # re-raised by _join
            box["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _join(t: threading.Thread, box: dict, timeout: float = 400) -> np.ndarray:
    t.join(timeout)
    assert not t.is_alive()
    if "err" in box:
        raise box["err"]
    return box["out"]


def _same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    diff = np.abs(a - b)
    assert a.shape == b.shape and diff.max() <= 1, (what, diff.max())


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=10).text
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_a_short_request_overtakes_a_running_long_one_and_shares_its_steps(server):
    """Fairness on events, not the clock: the short request finishes while the long one is still running, and its
    steps ran in the long one's running set (it joined at a step boundary instead of waiting). The long request is
    then dropped (its client goes away) rather than run to its end twice: mixed step counts equal to their solo
    runs are the next test's."""
    long = {"prompt": "a long walk", "seed": 1, "size": BIG, "num_inference_steps": 200,
            # more images make each of the long request's steps slower while the short one's trip through the text
            # encoder and the VAE stays the same: a margin against a loaded machine (progress counts all images)
            "n": min(7, 4 * server.denoiser_ranks - 1)}
    short = {"prompt": "a short hop", "seed": 2, "size": BIG, "num_inference_steps": 2}
    sock = _post_raw(server, long, "fair-long")
    try:
        _wait_running(server, "fair-long")
        shared_before = shared_steps(server)
        got_short = _gen(server, short, "fair-short")
        at_short = _progress(server, "fair-long")
        shared = shared_steps(server) - shared_before
    finally:
        sock.close()  # the long request's client goes away: it leaves the running set at the next step
    assert at_short["status"] == "running" and at_short["steps_done"] < at_short["steps_total"], at_short
    assert shared >= short["num_inference_steps"], shared  # the short one's steps ran beside the long one
    assert _progress(server, "fair-short")["status"] == "completed"
    _wait_status(server, "fair-long", "cancelled")
    _same(got_short, _gen(server, short), "short vs solo")


def _wait_status(server, rid: str, status: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while _progress(server, rid)["status"] != status:
        assert time.monotonic() < end, (rid, _progress(server, rid))
        time.sleep(0.05)


def test_mixed_step_counts_and_cfg_share_steps_and_each_equals_its_solo_run(server):
    reqs = []
    for k, (steps, cfg) in enumerate([(3, False), (7, True), (12, False), (3, True), (7, False), (12, True)]):
        body = {"prompt": f"mixed {k}", "seed": 10 + k, "size": "128x128", "num_inference_steps": steps}
        if cfg:
            body.update(negative_prompt="blurry", true_cfg_scale=3.0)
        reqs.append(body)
    shared_before = shared_steps(server)
    running = [_in_thread(_gen, server, body) for body in reqs]
    got = [_join(t, box) for t, box in running]
    shared = shared_steps(server) - shared_before
    assert shared >= 3, shared  # steps that ran more than one request
    for body, img in zip(reqs, got, strict=True):
        _same(img, _gen(server, body), body["prompt"])


def _post_raw(server, body: dict, rid: str) -> socket.socket:
    """POST over a raw socket (the test decides when the client goes away)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {API_KEY}\r\nX-Request-Id: {rid}\r\n".encode()
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_client_disconnect_frees_its_slot_at_the_next_step_and_the_other_is_unaffected(server):
    # the disconnect is seen within 0.1 s (the server polls it) and acted on at the next step: 40 steps of stay
    # outlast that by far; what the test waits for are events (both running, a retirement), not times
    stay = {"prompt": "the one that stays", "seed": 6, "size": "256x256", "num_inference_steps": 40}
    gone = {"prompt": "the one that leaves", "seed": 5, "size": "256x256", "num_inference_steps": 200}
    t, box = _in_thread(_gen, server, stay, "cancel-stay")
    sock = _post_raw(server, gone, "cancel-gone")
    _wait_running(server, "cancel-stay")
    _wait_running(server, "cancel-gone")
    retired = _metric(server, "omni_denoiser_step_retired_sum")
    sock.close()  # the client goes away mid-run
    end = time.monotonic() + 30
    while _metric(server, "omni_denoiser_step_retired_sum") < retired + 1:
        assert time.monotonic() < end, "the disconnected request never left the running set"
        time.sleep(0.02)
    stay_then = _progress(server, "cancel-stay")
    gone_then = _progress(server, "cancel-gone")
    assert stay_then["status"] == "running" and stay_then["steps_done"] < 40, stay_then  # left while stay ran
    assert gone_then["status"] == "cancelled" and gone_then["steps_done"] < 200, gone_then
    got = _join(t, box)
    _same(got, _gen(server, stay), "stay vs solo")
