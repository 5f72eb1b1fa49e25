"""What the edge knows of the served model and layout (``runtime.served_model``), without stage processes:

- a model directory that cannot be read is read once (a failure is remembered like a success) and logged once,
  naming the path and the error; once its ``model_index.json`` appears (an embedded model made on first use) it is
  read. The video-model check in front of the images route (``video_api``) shares that one read;
- TeaCache under HSDP (``[stages.denoiser.parallel] hsdp_shard > 1``) is refused at the edge, naming ``cache`` and
  the methods this server allows: the request check, the HTTP images route (a stub orchestrator), the CLI's
  ``generate`` and ``batch`` (nothing is started), and a ``[stages.denoiser.cache]`` default of TeaCache with HSDP
  is a config error;
- an edit is checked as a generation is (``EditRules.served``): the family's and the layout's refusals.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_server_harness import ROOT

from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import config_from_dict, load_config
from omni_runtime.runtime.requests import RequestError, parse_request
from omni_runtime.runtime.served_model import check_served, served_model_of

HSDP = {"denoiser": {"parallel": {"hsdp_shard": 2}}}
TEACACHE_REFUSED = ("cache.method='teacache': not supported with HSDP ([stages.denoiser.parallel] hsdp_shard = 2: "
                    "the first block's modulation weights are sharded outside its forward); allowed: first_block, "
                    "dbcache, none")


def _counted_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from omni_runtime.stages.models import family

    reads: list[str] = []
    real = family.family_of

    def counted(path):
        reads.append(str(path))
        return real(path)

    monkeypatch.setattr(family, "family_of", counted)
    return reads


def test_an_unreadable_model_dir_is_read_once_and_logged_once(tmp_path, monkeypatch, caplog) -> None:
    reads = _counted_reads(monkeypatch)
    model = tmp_path / "broken"
    model.mkdir()
    (model / "model_index.json").write_text("{not json")
    cfg = config_from_dict({"model": {"path": str(model)}})
    with caplog.at_level(logging.WARNING, logger="omni_runtime.runtime.served_model"):
        assert served_model_of(cfg) is None
        assert served_model_of(cfg) is None  # the second request: no second read, no second warning
    assert reads == [str(model)]
    warnings = [r.getMessage() for r in caplog.records if r.name == "omni_runtime.runtime.served_model"]
    assert len(warnings) == 1 and str(model) in warnings[0] and "model_index.json" in warnings[0], warnings


def test_a_model_made_after_a_failed_read_is_read(tmp_path, tiny_dir, monkeypatch) -> None:
    reads = _counted_reads(monkeypatch)
    model = tmp_path / "later"
    cfg = config_from_dict({"model": {"path": str(model)}})
    assert served_model_of(cfg) is None and served_model_of(cfg) is None
    model.mkdir()
    (model / "model_index.json").write_text((tiny_dir / "model_index.json").read_text())
    assert served_model_of(cfg).family == "flux"  # made now (an embedded model on first use): read
    assert served_model_of(cfg).family == "flux"
    assert reads == [str(model), str(model)]


@pytest.mark.parametrize("cache", [{"method": "teacache"}, {"method": "teacache", "threshold": 0.3}])
def test_teacache_under_hsdp_is_refused_at_the_edge(cache, tiny_dir) -> None:
    cfg = config_from_dict({"model": {"path": str(tiny_dir)}, "stages": HSDP})
    req = parse_request({"prompt": "a cat", "cache": cache})
    with pytest.raises(RequestError) as e:
        check_served(req, served_model_of(cfg))
    assert e.value.param == "cache" and str(e.value) == TEACACHE_REFUSED, str(e.value)
    for ok in ({"method": "first_block"}, {"method": "dbcache"}, {"method": "none"}):
        check_served(parse_request({"prompt": "a cat", "cache": ok}), served_model_of(cfg))
    unsharded = config_from_dict({"model": {"path": str(tiny_dir)}})
    check_served(req, served_model_of(unsharded))  # Flux runs TeaCache without HSDP
    unread = config_from_dict({"model": {"path": str(tiny_dir.parent / "nothing")}, "stages": HSDP})
    with pytest.raises(RequestError, match="not supported with HSDP"):  # the layout is known without the model
        check_served(req, served_model_of(unread))


def test_a_family_refusal_keeps_its_words_under_hsdp(qwen_tiny_dir) -> None:
    cfg = config_from_dict({"model": {"path": str(qwen_tiny_dir)}, "stages": HSDP})
    with pytest.raises(RequestError, match=r"^cache.method='teacache': the qwen_image family has no published "
                                           r"TeaCache coefficients; allowed: first_block, dbcache, none$"):
        check_served(parse_request({"prompt": "a cat", "cache": {"method": "teacache"}}), served_model_of(cfg))


def _hsdp_config(tmp_path: Path, tiny_dir: Path) -> Path:
    path = tmp_path / "hsdp2.toml"
    path.write_text((ROOT / "configs" / "hsdp2.toml").read_text().replace(
        'path = "../models/tiny-flux"', f'path = "{tiny_dir}"'))
    assert load_config(path).stages.denoiser.parallel.hsdp_shard == 2
    return path


def test_cli_generate_and_batch_refuse_teacache_under_hsdp_before_starting(tmp_path, tiny_dir, capsys,
                                                                             monkeypatch) -> None:
    from omni_runtime.runtime import cli

    cfg = _hsdp_config(tmp_path, tiny_dir)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "--config", str(cfg), "--prompt", "a cat", "--size", "64x64", "--steps", "2",
                     "--cache", "teacache:0.3", "-o", "out.png", "--in-process"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"omni-runtime generate: error: --cache: {TEACACHE_REFUSED}", err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat", "size": "64x64", "num_inference_steps": 2}) + "\n"
                       + json.dumps({"prompt": "a dog", "cache": {"method": "teacache"}}) + "\n")
    assert cli.main(["batch", "--config", str(cfg), str(prompts), "--out-dir", "out", "--in-process"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"omni-runtime batch: error: {prompts} line 2: {TEACACHE_REFUSED}", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hsdp2.toml", "p.jsonl"]  # nothing ran, nothing written


def test_a_teacache_default_under_hsdp_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^stages.denoiser.cache.method = 'teacache' with "
                                          r"stages.denoiser.parallel.hsdp_shard = 2: .*allowed: method = "
                                          r"'first_block', 'dbcache' or 'none', or hsdp_shard = 1$"):
        config_from_dict({"model": {"path": "m"},
                          "stages": {"denoiser": {"cache": {"method": "teacache"}, **HSDP["denoiser"]}}})


def test_the_images_route_refuses_teacache_under_hsdp(tiny_dir) -> None:
    """Through the HTTP edge (a stub orchestrator: no stages), and the server answers the next request."""
    from fastapi.testclient import TestClient
    from http_stub_server import StubOrchestrator

    from omni_runtime.runtime.server import create_app

    cfg = config_from_dict({"model": {"path": str(tiny_dir)}, "server": {"port": 0}, "stages": HSDP})
    orch = StubOrchestrator()
    with TestClient(create_app(cfg, orch)) as client:
        body = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2}
        r = client.post("/v1/images/generations", json={**body, "cache": {"method": "teacache", "threshold": 0.3}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache", r.text
        assert r.json()["error"]["message"] == TEACACHE_REFUSED, r.text
        r = client.post("/v1/images/generations", json={**body, "cache": {"method": "first_block"}})
        assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text


def test_the_images_route_reads_an_unreadable_model_once(tmp_path, monkeypatch, caplog) -> None:
    """The video-model check in front of POST /v1/images/generations (``video_api._ImagesToVideoModel``) and the
    image route share the edge's one read of the model (``served_model_of``): over two requests the unreadable
    directory is read once and logged once, and the image route answers."""
    from fastapi.testclient import TestClient
    from http_stub_server import StubOrchestrator

    from omni_runtime.runtime.server import create_app

    reads = _counted_reads(monkeypatch)
    model = tmp_path / "broken"
    model.mkdir()
    (model / "model_index.json").write_text("{not json")
    cfg = config_from_dict({"model": {"path": str(model)}, "server": {"port": 0}})
    with caplog.at_level(logging.WARNING, logger="omni_runtime.runtime.served_model"), \
            TestClient(create_app(cfg, StubOrchestrator())) as client:
        for _ in range(2):
            r = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64"})
            assert r.status_code == 200, r.text
    assert reads == [str(model)]
    warnings = [r.getMessage() for r in caplog.records if r.name == "omni_runtime.runtime.served_model"]
    assert len(warnings) == 1 and str(model) in warnings[0], warnings


def test_edits_refuse_what_the_family_or_the_layout_cannot_run(tmp_path, qwen_tiny_dir) -> None:
    """An edit is checked as a generation is: TeaCache on a Qwen-Image-Edit model (its family refuses it) and under
    HSDP (the layout refuses it) is a 400 naming ``cache`` through ``/v1/images/edits`` (a stub orchestrator),
    ``Omni.edit``'s and the CLI's ``parse_edit_request``, instead of failing late in the denoiser; the server then
    answers the next edit."""
    from fastapi.testclient import TestClient
    from http_stub_server import StubOrchestrator
    from image_bytes import png

    from omni_runtime.runtime.edit_requests import edit_rules, parse_edit_request
    from omni_runtime.runtime.server import create_app
    from omni_runtime.stages.models.family import family_for_class

    teacache = {"method": "teacache", "threshold": 0.3}
    qwen_edit = family_for_class("QwenImageEditPipeline").make_tiny(tmp_path / "qwen_edit", "tiny")
    rules = edit_rules(config_from_dict({"model": {"path": str(qwen_edit)}}))
    with pytest.raises(RequestError, match=r"cache\.method='teacache': the qwen_image_edit family .*allowed: "
                                           r"first_block, dbcache, none") as e:
        parse_edit_request({"prompt": "make it blue", "cache": teacache}, [png(64, 64)], rules)
    assert e.value.param == "cache"
    kontext = family_for_class("FluxKontextPipeline").make_tiny(tmp_path / "kontext", "tiny")
    cfg = config_from_dict({"model": {"path": str(kontext)}, "server": {"port": 0}, "stages": HSDP})
    with TestClient(create_app(cfg, StubOrchestrator())) as client:
        files = [("image", ("a.png", png(64, 64), "image/png"))]
        r = client.post("/v1/images/edits", files=files, data={"prompt": "x", "cache": json.dumps(teacache)})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache", r.text
        assert r.json()["error"]["message"] == TEACACHE_REFUSED, r.text
        r = client.post("/v1/images/edits", files=files, data={"prompt": "x", "num_inference_steps": "2"})
        assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text
