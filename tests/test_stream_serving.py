"""Streamed images (``stream: true``, ``partial_images``) through ``serve`` (the tiny Flux model, 64x64): the official
``openai`` client iterates the events unmodified; the raw SSE (httpx) has OpenAI's event names and shapes; every
partial image is diffusers' own predicted clean latent of that step (a forward hook on ``FluxPipeline``'s
transformer: ``x0 = x_t - sigma_t * v``) decoded by its VAE, and the final image equals the same request without
streaming (both <= 2/255); the first partial comes before the final image (event order; the times are printed);
``n = 2`` streams each image's events (``image_index``); a client that disconnects cancels its request at the next
step and the next request runs at once; bad values are 400 naming the field; an error after the stream started is
an ``error`` event.

One server for the module.
"""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from image_bytes import decode_b64
from openai import APIError, OpenAI
from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent
from test_server_harness import API_KEY, ROOT, Server

from omni_runtime.runtime.model_store import ensure_model
from omni_runtime.stages.step_batch import preview_steps

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]

PROMPT = "a lighthouse at dusk"
STEPS = 8
BODY = {"prompt": PROMPT, "size": "64x64", "seed": 11, "num_inference_steps": STEPS}
GEN = "/v1/images/generations"


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("stream"))
    yield s
    s.stop()
    assert s.shm_entries() == []


@pytest.fixture(scope="module")
def references() -> dict[str, object]:
    """diffusers' FluxPipeline for BODY: the final image and the predicted clean latent of every step decoded."""
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(ensure_model(str(ROOT / "models" / "tiny-flux"))), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = pipe.transformer.register_forward_hook(
        lambda _m, _a, kw, out: seen.append((kw["hidden_states"].clone(), out[0].clone())), with_kwargs=True)
    final = pipe(PROMPT, height=64, width=64, num_inference_steps=STEPS,
                 generator=torch.Generator("cpu").manual_seed(BODY["seed"])).images[0]
    hook.remove()
    sigmas = pipe.scheduler.sigmas
    previews = {}
    with torch.no_grad():
        for done in range(1, STEPS):
            x, v = seen[done - 1]
            x0 = pipe._unpack_latents(x - sigmas[done - 1] * v, 64, 64, pipe.vae_scale_factor)
            x0 = x0 / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            img = pipe.vae.decode(x0, return_dict=False)[0]
            previews[done] = np.asarray(pipe.image_processor.postprocess(img, output_type="pil")[0])
    return {"final": np.asarray(final), "previews": previews}


def _events(server: Server, body: dict, headers: dict | None = None) -> list[tuple[str, dict, float]]:
    """POST a streamed request and parse its SSE by hand: (event name, data, seconds since the POST) each."""
    out, name, t0 = [], None, time.monotonic()
    with httpx.stream("POST", server.url + GEN, json=body, headers={**server.headers, **(headers or {})},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:]), time.monotonic() - t0))
    return out


@pytest.fixture(scope="module")
def streamed(server) -> list[tuple[str, dict, float]]:
    return _events(server, {**BODY, "stream": True, "partial_images": 3})


def test_raw_sse_has_openai_event_names_and_shapes(server, streamed) -> None:
    import jsonschema

    names = [n for n, _, _ in streamed]
    assert names == ["image_generation.partial_image"] * 3 + ["image_generation.completed"], names
    for name, data, _ in streamed:
        assert data["type"] == name
        assert data["size"] == "64x64" and data["output_format"] == "png" and data["quality"] == "auto"
        assert data["background"] == "opaque" and isinstance(data["created_at"], int) and data["image_index"] == 0
        assert decode_b64(data["b64_json"]).shape == (64, 64, 3)
    assert [d["partial_image_index"] for _, d, _ in streamed[:3]] == [0, 1, 2]
    # every event is what /openapi.json documents
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    event = spec["paths"][GEN]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    for name, data, _ in streamed:
        jsonschema.validate({"event": name, "data": json.dumps(data)}, event)
        jsonschema.validate(data, event["properties"]["data"]["contentSchema"])
    done = streamed[-1][1]
    assert done["seed"] == BODY["seed"] and "partial_image_index" not in done
    assert done["usage"] == {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                             "output_tokens": 0, "total_tokens": 0}


def test_partials_are_diffusers_predicted_clean_latents_and_the_final_is_diffusers(streamed, references) -> None:
    steps = preview_steps(STEPS, 3)
    assert steps == (2, 4, 6)
    for (_, data, _), step in zip(streamed[:3], steps, strict=True):
        assert _diff(decode_b64(data["b64_json"]), references["previews"][step]) <= 2, step
    final = decode_b64(streamed[-1][1]["b64_json"])
    assert _diff(final, references["final"]) <= 2
    # the previews move towards the final image (and are not the final image already)
    gaps = [np.abs(decode_b64(d["b64_json"]).astype(int) - final.astype(int)).mean() for _, d, _ in streamed[:3]]
    assert gaps[0] > gaps[2] and gaps[0] > 1, gaps


def test_the_completed_image_equals_the_same_request_without_streaming(server, streamed) -> None:
    r = httpx.post(server.url + GEN, json=BODY, headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text
    assert _diff(decode_b64(r.json()["data"][0]["b64_json"]), decode_b64(streamed[-1][1]["b64_json"])) <= 2


def test_the_first_partial_comes_well_before_the_final_image(server) -> None:
    """By event order (the first partial, after 1/4 of the steps, is an event before the final one); the times are
    printed (tools/bench_stream.py measures them under load)."""
    ev = _events(server, {**BODY, "num_inference_steps": 16, "stream": True, "partial_images": 3})
    names = [n for n, _, _ in ev]
    assert names[0] == "image_generation.partial_image" and names[-1] == "image_generation.completed", names
    first, full = ev[0][2], ev[-1][2]
    print(f"time to first partial {first:.3f}s, full latency {full:.3f}s, ratio {first / full:.2f}")
    assert first < full


def test_official_client_iterates_the_stream_unmodified(server, streamed) -> None:
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    stream = client.images.generate(prompt=PROMPT, size="64x64", stream=True, partial_images=2,
                                    extra_body={"seed": BODY["seed"], "num_inference_steps": STEPS})
    events = list(stream)
    assert [type(e) for e in events] == [ImageGenPartialImageEvent] * 2 + [ImageGenCompletedEvent]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert events[-1].usage.total_tokens == 0 and events[-1].size == "64x64"
    assert _diff(decode_b64(events[-1].b64_json), decode_b64(streamed[-1][1]["b64_json"])) <= 2
    # partial_images = 0: one event, the image
    only = list(client.images.generate(prompt=PROMPT, size="64x64", stream=True, partial_images=0,
                                       extra_body={"seed": BODY["seed"], "num_inference_steps": 2}))
    assert [type(e) for e in only] == [ImageGenCompletedEvent]


def test_n2_streams_each_images_events_told_apart_by_image_index(server, streamed) -> None:
    ev = _events(server, {**BODY, "n": 2, "stream": True, "partial_images": 2})
    for i in (0, 1):
        mine = [(n, d) for n, d, _ in ev if d["image_index"] == i]
        assert [n for n, _ in mine] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        assert [d["partial_image_index"] for _, d in mine[:2]] == [0, 1]
        assert mine[-1][1]["seed"] == BODY["seed"] + i
    first = next(d for n, d, _ in ev if n.endswith("completed") and d["image_index"] == 0)
    assert _diff(decode_b64(first["b64_json"]), decode_b64(streamed[-1][1]["b64_json"])) <= 2


def _progress(server: Server, rid: str) -> dict:
    return httpx.get(f"{server.url}/v1/requests/{rid}", headers=server.headers, timeout=10).json()


def test_a_client_that_disconnects_cancels_its_request_and_frees_the_denoiser(server) -> None:
    rid = "stream-disconnect-1"
    body = {**BODY, "num_inference_steps": 60, "stream": True, "partial_images": 3}
    with httpx.stream("POST", server.url + GEN, json=body, headers={**server.headers, "X-Request-Id": rid},
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("event: image_generation.partial_image"):
                break  # the first partial (after 15 of 60 steps): hang up
    end = time.monotonic() + 60
    while _progress(server, rid).get("status") != "cancelled":
        assert time.monotonic() < end, _progress(server, rid)
        time.sleep(0.1)
    p = _progress(server, rid)
    assert 15 <= p["steps_done"] < 60, p
    # the denoiser is free: the next request runs alone and completes; nothing is held
    t0 = time.monotonic()
    r = httpx.post(server.url + GEN, json={**BODY, "num_inference_steps": 2}, headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text
    assert _progress(server, rid)["steps_done"] == p["steps_done"]  # it did not run on
    print(f"next request after the disconnect: {time.monotonic() - t0:.2f}s")
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    assert "client disconnected from a stream" in server.log_text()
    end = time.monotonic() + 10
    while server.held_shm_entries():
        assert time.monotonic() < end, server.held_shm_entries()
        time.sleep(0.1)


BAD = {
    "partials_4": ({"stream": True, "partial_images": 4}, "partial_images", "from 0 to 3"),
    "partials_negative": ({"stream": True, "partial_images": -1}, "partial_images", "from 0 to 3"),
    "partials_text": ({"stream": True, "partial_images": "two"}, "partial_images", "from 0 to 3"),
    "partials_without_stream": ({"partial_images": 2}, "partial_images", "only with stream=true"),
    "partials_stream_false": ({"stream": False, "partial_images": 1}, "partial_images", "only with stream=true"),
    "stream_not_bool": ({"stream": "yes"}, "stream", "allowed values are true, false"),
    "stream_url": ({"stream": True, "response_format": "url"}, "response_format", "b64_json"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_stream_fields_are_400_naming_the_field(server, case) -> None:
    extra, param, says = BAD[case]
    r = httpx.post(server.url + GEN, json={**BODY, **extra}, headers=server.headers, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_the_official_client_gets_a_400_for_bad_partial_images(server) -> None:
    from openai import BadRequestError

    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    with pytest.raises(BadRequestError, match="partial_images"):
        client.images.generate(prompt=PROMPT, size="64x64", stream=True, partial_images=7)


def test_an_error_after_the_stream_started_is_an_error_event(server) -> None:
    """The denoiser's rank is killed after the first partial: the stream ends with one ``error`` event (503), which
    the official client raises as APIError; the replica restarts and serves again."""
    import psutil

    den = next(p for p in server.stage_procs() if "denoiser" in " ".join(p.cmdline()))
    body = {**BODY, "num_inference_steps": 60, "stream": True, "partial_images": 3}
    names, last = [], None
    with httpx.stream("POST", server.url + GEN, json=body, headers=server.headers, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                names.append(line[7:])
                if len(names) == 1:
                    den.kill()
            elif line.startswith("data: "):
                last = json.loads(line[6:])
    assert names[0] == "image_generation.partial_image" and names[-1] == "error", names
    assert last["type"] == "error" and last["error"]["code"] == "stage_unavailable", last
    assert "denoiser" in last["error"]["message"]
    psutil.wait_procs([den], timeout=10)
    end = time.monotonic() + 120
    while httpx.get(server.url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < end, server.log_text()[-3000:]
        time.sleep(0.2)
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    events = list(client.images.generate(prompt=PROMPT, size="64x64", stream=True, partial_images=1,
                                         extra_body={"seed": 1, "num_inference_steps": 4}))
    assert [type(e) for e in events] == [ImageGenPartialImageEvent, ImageGenCompletedEvent]
    with pytest.raises(APIError):  # the client raises the error event
        stream = client.images.generate(prompt=PROMPT, size="64x64", stream=True, partial_images=3,
                                        extra_body={"seed": 1, "num_inference_steps": 60})
        for i, _ in enumerate(stream):
            if i == 0:
                next(p for p in server.stage_procs() if "denoiser" in " ".join(p.cmdline())).kill()
    end = time.monotonic() + 120
    while httpx.get(server.url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < end, server.log_text()[-3000:]
        time.sleep(0.2)
