"""``omni-runtime serve`` on the default config (tiny model): OpenAI client, raw HTTP, batching, bad requests,
auth, a killed stage rank, and a clean shutdown. One server for the whole module (starting one costs seconds)."""

from __future__ import annotations

import base64
import concurrent.futures
import re
import signal
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from image_bytes import decode_b64
from test_server_harness import API_KEY, Server, image_of, post_and_kill

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]

SMALL = {"size": "64x64", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), max_queue=24)
    yield s
    s.stop()


def _post(server, body, headers=None, timeout=60):
    return httpx.post(server.url + "/v1/images/generations", json=body,
                      headers=server.headers if headers is None else headers, timeout=timeout)


def test_openai_client_n2_and_seed_rule(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    out = client.images.generate(model="tiny-flux", prompt="a red fox", n=2, size="64x64",
                                 response_format="b64_json", extra_body={"seed": 11, "num_inference_steps": 2})
    assert len(out.data) == 2 and out.created > 0
    a, b = (decode_b64(d.b64_json) for d in out.data)
    assert a.shape == b.shape == (64, 64, 3)
    assert not np.array_equal(a, b)
    # image 1 of a request with seed 11 is the image of a request with seed 12, up to the last bit of rounding:
    # a batch of 2 and a batch of 1 sum their GEMMs in a different order (the in-process runtime does the same)
    single = decode_b64(_post(server, {"prompt": "a red fox", "seed": 12, **SMALL}).json()["data"][0]["b64_json"])
    diff = np.abs(single.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    other = np.abs(single.astype(int) - a.astype(int))
    assert other.mean() > 5  # and it is not image 0
    assert [m.id for m in client.models.list().data] == ["tiny-flux"]


def test_raw_http_is_reproducible_and_matches_the_in_process_pipeline(server):
    from omni_runtime.runtime import Omni

    body = {"prompt": "a lighthouse at dusk", "seed": 5, "response_format": "b64_json", **SMALL}
    r1, r2 = _post(server, body), _post(server, body)
    assert r1.status_code == r2.status_code == 200, r1.text
    assert r1.json()["data"][0]["b64_json"] == r2.json()["data"][0]["b64_json"]
    with Omni(server.config_path, in_process=True) as omni:
        ref = np.asarray(omni.generate("a lighthouse at dusk", seed=5, **SMALL)[0])
    assert np.array_equal(decode_b64(r1.json()["data"][0]["b64_json"]), ref)
    jpeg = _post(server, {**body, "output_format": "jpeg"}).json()["data"][0]["b64_json"]
    assert base64.b64decode(jpeg)[:3] == b"\xff\xd8\xff"


def test_auth_and_side_routes(server):
    assert _post(server, {"prompt": "x", **SMALL}, headers={}).status_code == 401
    bad = _post(server, {"prompt": "x", **SMALL}, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    assert bad.headers["www-authenticate"].startswith("Bearer")
    form = httpx.post(server.url + "/v1/images/generations", content=b'{"prompt": "x"}',  # a cross-site form post
                      headers={**server.headers, "content-type": "text/plain"})
    assert form.status_code == 415 and form.json()["error"]["code"] == "unsupported_media_type"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["stages"] == {"text_encoder": [True], "denoiser": [True], "vae": [True]}
    assert h["replicas"] == {s: [{"state": "ready", "generation": 1, "last_failure": None}]
                             for s in ("text_encoder", "denoiser", "vae")}
    assert "/v1/images/generations" in httpx.get(server.url + "/openapi.json").json()["paths"]
    assert httpx.get(server.url + "/docs").status_code == 200


def _batch_counts(server, stage):
    """(batches of one item, batches) the stage ran so far; (0, 0) before its first batch (the histogram has no
    series yet), so a test that runs first or alone counts from zero."""
    text = httpx.get(server.url + "/metrics").text
    ones = re.search(rf'omni_batch_size_bucket{{le="1.0",stage="{stage}"}} (\S+)', text)
    total = re.search(rf'omni_batch_size_count{{stage="{stage}"}} (\S+)', text)
    assert (ones is None) == (total is None), text
    return (float(ones.group(1)), float(total.group(1))) if total else (0.0, 0.0)


def test_16_concurrent_requests_are_batched(server):
    ones0, total0 = _batch_counts(server, "denoiser")
    barrier = threading.Barrier(16)

    def one(i):
        barrier.wait()
        return _post(server, {"prompt": f"prompt {i}", "seed": i, "size": "64x64", "num_inference_steps": 4})

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        rs = list(ex.map(one, range(16)))
    assert [r.status_code for r in rs] == [200] * 16
    ones1, total1 = _batch_counts(server, "denoiser")
    batches, single = total1 - total0, ones1 - ones0
    assert batches < 16 and single < batches, (batches, single)  # at least one batch held more than one item
    text = httpx.get(server.url + "/metrics").text
    for name in ("omni_queue_depth{stage=\"vae\"}", "omni_stage_latency_seconds_count{stage=\"text_encoder\"}",
                 "omni_stage_compute_seconds_count{stage=\"denoiser\"}"):
        assert name in text


MALFORMED = [
    ("{not json", None), ("[]", None), ({}, "prompt"), ({"prompt": 123}, "prompt"), ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "size": "0x0"}, "size"), ({"prompt": "x", "size": "17x17"}, "size"),
    ({"prompt": "x", "size": "17"}, "size"), ({"prompt": "x", "size": "100000x100000"}, "size"),
    ({"prompt": "x", "size": "abc"}, "size"), ({"prompt": "x", "size": 64}, "size"),
    ({"prompt": "x", "size": "64x64x64"}, "size"), ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "n": 99}, "n"),
    ({"prompt": "x", "n": "2"}, "n"), ({"prompt": "x", "num_inference_steps": -1}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 1.5}, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"), ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": "x"}, "seed"), ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "output_format": "gif"}, "output_format"), ({"prompt": "a" * 100_000}, "prompt"),
    ({"prompt": "x", "negative_prompt": 5}, "negative_prompt"), ({"prompt": "x", "true_cfg_scale": 0.5},
                                                                 "true_cfg_scale"),
    ({"prompt": "x", "user": 5}, "user"), ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "x", "priority": "high"}, "priority"), ({"prompt": "x", "lora": "style"}, "lora"),
    ({"prompt": "x", "cache": {"method": "sometimes"}}, "cache"),
]


def test_malformed_cases_cover_every_checked_field():
    """Every request field that is checked (all but the accepted-and-ignored ones) has a malformed case above."""
    from omni_runtime.runtime.requests import FIELDS

    checked = {name for name, f in FIELDS.items() if f.kind != "ignored"}
    assert checked - {p for _, p in MALFORMED} == set()


def test_malformed_requests_get_400_naming_the_field(server):
    got = []
    for body, _ in MALFORMED:
        if isinstance(body, str):
            r = httpx.post(server.url + "/v1/images/generations", content=body,
                           headers={**server.headers, "content-type": "application/json"})
        else:
            r = _post(server, body)
        err = r.json()["error"]
        got.append((r.status_code, err["param"], err["type"]))
    assert got == [(400, p, "invalid_request_error") for _, p in MALFORMED]
    assert httpx.get(server.url + "/health").status_code == 200
    assert _post(server, {"prompt": "still fine", "seed": 1, **SMALL}).status_code == 200


def _queue_depths(server):
    text = httpx.get(server.url + "/metrics").text
    return [float(v) for v in re.findall(r'omni_queue_depth{stage="\w+"} (\S+)', text)]


def test_full_queue_gives_429_and_disconnected_clients_are_cancelled(server):
    import asyncio

    slow = {"prompt": "slow", "seed": 1, "size": "256x256", "num_inference_steps": 40, "n": 10}

    async def scenario():
        async with httpx.AsyncClient(headers=server.headers, timeout=120) as client:
            url = server.url + "/v1/images/generations"
            slow_tasks = [asyncio.create_task(client.post(url, json=slow)) for _ in range(2)]
            end = time.monotonic() + 60
            # both admitted (20 items); once more than 14 of them wait for one stage, 10 more exceed max_queue 24
            while max(_queue_depths(server), default=0) < 15:
                assert time.monotonic() < end and not any(t.done() for t in slow_tasks), _queue_depths(server)
                await asyncio.sleep(0.05)
            third = await client.post(url, json=slow)
            for t in slow_tasks:  # the two clients go away: their connections close
                t.cancel()
            await asyncio.gather(*slow_tasks, return_exceptions=True)
            return third

    r = asyncio.run(scenario())
    assert r.status_code == 429 and r.headers["Retry-After"] == "1", r.text
    assert r.json()["error"]["code"] == "queue_full" and "max_queue 24" in r.json()["error"]["message"]
    end = time.monotonic() + 60
    while server.log_text().count("client disconnected") < 2 or any(_queue_depths(server)):
        assert time.monotonic() < end, (_queue_depths(server), server.log_text()[-2000:])
        time.sleep(0.2)
    # Queued items of the cancelled requests are dropped (and their inputs unlinked) once the denoiser finishes
    # the batch it is running; then no segment is held (a stage's pool keeps released ones for reuse, bounded).
    while server.held_shm_entries():
        assert time.monotonic() < end, server.held_shm_entries()
        time.sleep(0.2)
    assert _post(server, {"prompt": "after", "seed": 1, **SMALL}).status_code == 200


def test_sigkill_of_a_denoiser_rank_fails_in_flight_fast_then_recovers(server):
    den = [p for p in server.stage_procs() if "denoiser[0] rank 0/1" in " ".join(p.cmdline())]
    assert len(den) == 1
    after_body = {"prompt": "after the crash", "seed": 1, **SMALL}
    before = image_of(server, after_body)
    r, after_kill = post_and_kill(server, den[0], {"prompt": "slow", "seed": 3, "size": "512x512",
                                                   "num_inference_steps": 200})
    # fast, on events rather than the clock: the 503 comes from the rank's death (not from the stall watch, which
    # says "hung", nor the request timeout) and before the restarted replica is ready (/health is 503 below)
    assert r.status_code == 503 and "denoiser[0] rank 0 died" in r.json()["error"]["message"], r.text
    # sent at once, while the denoiser restarts: it waits for the new replica instead of failing
    assert httpx.get(server.url + "/health").status_code == 503
    assert np.array_equal(image_of(server, after_body), before)  # the restarted replica computes the same image
    assert httpx.get(server.url + "/health").status_code == 200
    assert "denoiser[0] ready (generation 2)" in server.log_text()


def test_sigterm_leaves_no_process_and_no_shm(server):
    pids = [p.pid for p in server.stage_procs()]
    assert len(pids) == 3
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    log = server.log_text()
    assert "orchestrator stopped" in log and "Application shutdown complete" in log
    assert server.leftover == []
    assert [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []
    assert server.shm_entries() == []
