"""Defects at the user-facing edge (wave 3 leftovers): each test failed before its fix.

One served instance per model, shared by the module (tiny models, small sizes, 2 steps): a Qwen-Image-Edit server
(generations refused at the edge) and a Wan server (TeaCache refused at the edge, video requests counted, the job
schema); the rest runs without stages (configs, CLI flags, a stub orchestrator's failing stream)."""

from __future__ import annotations

import re

import httpx
import pytest
from test_server_harness import ROOT, serving

from omni_runtime.runtime.config_load import load_config


def _requests_total(server_url: str, headers: dict[str, str]) -> dict[str, float]:
    """``omni_requests_total`` by status, from ``GET /metrics``."""
    text = httpx.get(server_url + "/metrics", headers=headers, timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'^omni_requests_total\{status="(\d+)"\} (\S+)$',
                                                                 text, re.M)}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


# --- 6: the shipped configs load, and an edit config's image limit is what its model family takes --------------


def test_every_shipped_config_loads_and_edit_configs_allow_what_their_family_takes():
    from omni_runtime.runtime.preflight import model_family
    from omni_runtime.stages.models.family import REGISTRY, family_for_class

    served: dict[str, list[str]] = {}
    for path in sorted((ROOT / "configs").glob("*.toml")):
        cfg = load_config(path)  # every shipped config is valid
        family = model_family(cfg)  # from model_index.json, or the embedded model's (nothing is made)
        served.setdefault(family.name, []).append(path.name)
        if family.image_inputs > 0:
            assert cfg.server.max_edit_images == family.image_inputs, (path.name, family.name)
    edit_families = {family_for_class(c).name for c in REGISTRY if family_for_class(c).image_inputs > 0}
    assert {"flux-kontext", "qwen_image_edit", "qwen_image_edit_plus"} <= edit_families
    assert [f for f in sorted(edit_families) if f not in served] == [], served  # each edit family has its config


# --- 5: the CLI checks its flags before it makes the embedded model ---------------------------------------------


@pytest.mark.parametrize(("flags", "says"), [
    (["--steps", "0"], "--steps"),
    (["--size", "10x10"], "--size"),
    (["--seed", "-1"], "--seed"),
    (["--guidance", "1000"], "--guidance"),
    (["--cache", "magic"], "--cache"),
    (["--num-frames", "0", "-o", "out.mp4"], "--num-frames"),
    (["-o", "out.gif"], "--output"),
])
def test_cli_bad_flag_exits_2_naming_it_before_any_model_is_made(flags, says, tmp_path, capsys, monkeypatch):
    from omni_runtime.runtime.cli import main

    models = tmp_path / "models"
    cfg = tmp_path / "c.toml"
    cfg.write_text((ROOT / "configs" / "default.toml").read_text().replace(
        'path = "../models/tiny-flux"', f'path = "{models / "tiny-flux"}"'))
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--config", str(cfg), "--prompt", "a cat", "-o", "out.png", "--in-process"]
    assert main(argv + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("omni-runtime generate: error: ") and says in err and len(err.splitlines()) == 1, err
    assert not models.exists()  # no model made, nothing written
    assert list(tmp_path.iterdir()) == [cfg]


# --- 1: a generation sent to an edit-only model is refused at the edge ------------------------------------------


@pytest.fixture(scope="module")
def edit_server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("edge-qwen-edit"), base_config="qwen_image_edit.toml") as s:
        yield s


def test_generation_on_an_edit_only_model_is_a_400_naming_image(edit_server):
    s = edit_server
    before = _requests_total(s.url, s.headers)
    r = httpx.post(s.url + "/v1/images/generations", headers=s.headers, timeout=120,
                   json={"prompt": "a cat", "size": "64x64", "num_inference_steps": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "image" and "/v1/images/edits" in err["message"], err
    assert "qwen_image_edit" in err["message"], err
    assert _delta(_requests_total(s.url, s.headers), before) == {"400": 1.0}
    assert "Traceback" not in s.log_text()  # refused at the edge: no stage saw it
    assert httpx.get(s.url + "/health", timeout=30).status_code == 200


def test_cli_generate_on_an_edit_only_model_says_to_give_an_image(edit_server, tmp_path, capsys, monkeypatch):
    from omni_runtime.runtime.cli import main

    monkeypatch.chdir(tmp_path)  # the model exists: edit_server made it
    argv = ["generate", "--config", str(ROOT / "configs" / "qwen_image_edit.toml"), "--prompt", "a cat", "--size",
            "64x64", "--steps", "2", "-o", "out.png", "--in-process"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("omni-runtime generate: error: image is required") and "generate --image" in err, err
    assert list(tmp_path.iterdir()) == []



def test_a_batch_generation_line_for_an_edit_only_model_names_its_line_and_image(edit_server, tmp_path):
    """``batch`` checks each line against the served family before any stage runs (it failed at the text encoder)."""
    from omni_runtime.runtime.offline import read_prompts
    from omni_runtime.runtime.requests import RequestError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "size": "64x64"}\n')
    with pytest.raises(RequestError) as e:
        read_prompts(prompts, cfg=load_config(ROOT / "configs" / "qwen_image_edit.toml"))
    assert e.value.param == "image" and "line 1: image is required" in str(e.value), str(e.value)

# --- 2: TeaCache on a video (a family without it) is refused at the edge ----------------------------------------

VIDEO = {"prompt": "a dog on a beach", "size": "32x32", "num_frames": 5, "num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def wan_server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("edge-wan"), base_config="wan.toml") as s:
        yield s


def test_teacache_on_a_video_is_a_400_naming_cache_and_the_allowed_methods(wan_server):
    s = wan_server
    jobs = httpx.get(s.url + "/v1/videos", headers=s.headers, timeout=30).json()["data"]
    form_headers = {k: v for k, v in s.headers.items() if k.lower() != "content-type"}
    for r in (httpx.post(s.url + "/v1/videos", headers=s.headers, timeout=60,
                         json={**VIDEO, "cache": {"method": "teacache", "threshold": 0.3}}),
              httpx.post(s.url + "/v1/videos/sync", headers=s.headers, timeout=60,
                         json={**VIDEO, "cache": {"method": "teacache"}}),
              httpx.post(s.url + "/v1/videos", headers=form_headers, timeout=60,
                         files={**{k: (None, str(v)) for k, v in VIDEO.items()},
                                "cache": (None, '{"method": "teacache"}')})):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "cache", err
        assert "teacache" in err["message"] and "allowed: first_block, dbcache, none" in err["message"], err
    assert httpx.get(s.url + "/v1/videos", headers=s.headers, timeout=30).json()["data"] == jobs  # no job made
    assert httpx.get(s.url + "/health", timeout=30).status_code == 200


def test_each_family_refuses_teacache_exactly_where_its_transformer_has_no_coefficients():
    """The edge's declaration (``ModelFamily.cache_refusals``) and the denoiser's (the transformer's ``CachePlan``)
    agree for every served family."""
    from omni_runtime.stages.models.family import REGISTRY, family_for_class
    from omni_runtime.stages.models.flux.transformer import FluxTransformer
    from omni_runtime.stages.models.qwen_image.transformer import QwenImageTransformer
    from omni_runtime.stages.models.wan.transformer import WanTransformer

    transformer = {"FluxPipeline": FluxTransformer, "FluxKontextPipeline": FluxTransformer,
                   "QwenImagePipeline": QwenImageTransformer, "QwenImageEditPipeline": QwenImageTransformer,
                   "QwenImageEditPlusPipeline": QwenImageTransformer, "WanPipeline": WanTransformer}
    assert sorted(transformer) == sorted(REGISTRY)
    for pipeline, cls in transformer.items():
        family, plan = family_for_class(pipeline), cls._cache_plan
        assert ("teacache" in family.cache_refusals) == (not plan.teacache), pipeline
        assert set(family.cache_refusals) <= {"teacache"}, pipeline


# --- 3: the request metrics count the video routes, and a stream that fails by what it failed with ---------------


def test_video_requests_are_counted_by_status(wan_server):
    s = wan_server
    before = _requests_total(s.url, s.headers)
    assert httpx.post(s.url + "/v1/videos", headers=s.headers, json={**VIDEO, "num_frames": 4},
                      timeout=60).status_code == 400
    assert httpx.get(s.url + "/v1/videos/video_nope", headers=s.headers, timeout=30).status_code == 404
    assert httpx.get(s.url + "/v1/videos", headers=s.headers, timeout=30).status_code == 200
    assert httpx.get(s.url + "/v1/videos", timeout=30).status_code == 401
    assert _delta(_requests_total(s.url, s.headers), before) == {"400": 1.0, "404": 1.0, "200": 1.0, "401": 1.0}


def test_a_stream_that_fails_after_it_started_is_counted_as_its_error():
    """A stub orchestrator sends one partial image, then fails as a stage refusing the request (400) would."""
    from fastapi.testclient import TestClient
    from http_stub_server import StubOrchestrator, stub_config

    from omni_runtime.runtime.image_stream import ImageEvent
    from omni_runtime.runtime.orchestrator import BadRequestInStage
    from omni_runtime.runtime.server import create_app

    class FailingMidStream(StubOrchestrator):
        async def generate(self, req, request_id=None, report=None, *, on_event=None):
            import asyncio

            await asyncio.sleep(0.05)
            if on_event is not None:
                on_event(ImageEvent(0, b"preview", partial=0))
            await asyncio.sleep(0.05)
            raise BadRequestInStage("stage denoiser rejected the request: cache.fn + cache.bn too large")

    app = create_app(stub_config(), FailingMidStream())
    with TestClient(app) as client:
        body = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2, "stream": True, "partial_images": 1}
        r = client.post("/v1/images/generations", json=body)
        assert r.status_code == 200 and "event: error" in r.text and "rejected the request" in r.text, r.text
        metrics = client.get("/metrics").text
    assert 'omni_requests_total{status="400"} 1.0' in metrics, metrics
    assert 'omni_requests_total{status="200"}' not in metrics, metrics


# --- 4: the video job's OpenAPI schema has every field the job JSON has -------------------------------------------


def test_video_job_schema_matches_a_real_job(wan_server):
    s = wan_server
    r = httpx.post(s.url + "/v1/videos", headers=s.headers, timeout=60,
                   json={**VIDEO, "cache": {"method": "first_block", "threshold": 0.1}})
    assert r.status_code == 200, r.text
    job = s.finished_video(r.json()["id"], timeout_s=120)
    assert "cache" in job and "peak_memory_mb" in job, job  # the extension fields a finished job carries
    paths = httpx.get(s.url + "/openapi.json", timeout=30).json()["paths"]
    schemas = [paths["/v1/videos"]["post"], paths["/v1/videos/{video_id}"]["get"]]
    for op in schemas:
        schema = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert set(schema["properties"]) == set(job), sorted(set(schema["properties"]) ^ set(job))
        assert set(schema["required"]) <= set(job) and set(schema["required"]) <= set(r.json())
    listed = paths["/v1/videos"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(listed["properties"]["data"]["items"]["properties"]) == set(job)
