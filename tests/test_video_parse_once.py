"""A video request is checked once, on one path (``runtime.video_request.parse_video``), by every edge: the HTTP
route (a stub orchestrator: no stages), ``Omni.generate_video`` / ``generate`` / ``batch`` (``parse_video``). Its
fields are checked before an embedded model is made, and the errors name the field as before."""

from __future__ import annotations

import pytest

from omni_runtime.runtime import video_request
from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.requests import RequestError
from omni_runtime.runtime.video_request import parse_video

BODY = {"prompt": "a dog", "size": "32x32", "num_inference_steps": 2, "seed": 3}


@pytest.fixture
def field_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every check of a request's fields against the video table, by the fields' ``prompt``."""
    calls: list[str] = []
    real = video_request.check_fields

    def counted(raw, table, **kw):
        calls.append(raw.get("prompt"))
        return real(raw, table, **kw)

    monkeypatch.setattr(video_request, "check_fields", counted)
    return calls


def test_parse_video_checks_the_fields_once(wan_tiny_dir, field_checks) -> None:
    cfg = config_from_dict({"model": {"path": str(wan_tiny_dir)}})
    vr = parse_video({**BODY, "num_frames": 5}, cfg)
    assert (vr.req.num_frames, vr.req.width, vr.fps) == (5, 32, cfg.video.fps)
    assert field_checks == ["a dog"]
    with pytest.raises(RequestError, match=r"^num_frames=4: this model takes 4 k \+ 1 frames; nearest: 1 or 5$"):
        parse_video({**BODY, "num_frames": 4}, cfg)
    assert field_checks == ["a dog", "a dog"]


def test_a_bad_field_fails_before_an_embedded_model_is_made(tmp_path, field_checks) -> None:
    model = tmp_path / "models" / "tiny-wan"
    cfg = config_from_dict({"model": {"path": str(model)}})
    for body, param in (({**BODY, "num_frames": 0}, "num_frames"), ({**BODY, "quality": "hd"}, "quality"),
                        ({**BODY, "cache": {"method": "magic"}}, "cache")):
        with pytest.raises(RequestError) as e:
            parse_video(body, cfg)
        assert e.value.param == param, (body, str(e.value))
    assert not (tmp_path / "models").exists()  # nothing made
    assert len(field_checks) == 3


def test_the_http_route_checks_once_on_the_same_path(wan_tiny_dir, field_checks) -> None:
    from fastapi.testclient import TestClient
    from http_stub_server import StubOrchestrator

    from omni_runtime.runtime.server import create_app

    cfg = config_from_dict({"model": {"path": str(wan_tiny_dir)}, "server": {"port": 0},
                            "stages": {"denoiser": {"parallel": {"hsdp_shard": 2}}}})
    with TestClient(create_app(cfg, StubOrchestrator())) as client:
        r = client.post("/v1/videos", json={**BODY, "num_frames": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "num_frames", r.text
        assert field_checks == ["a dog"]
        form = {**BODY, "num_frames": 5, "cache": '{"method": "teacache"}'}  # multipart: the same check
        r = client.post("/v1/videos", files={k: (None, str(v)) for k, v in form.items()})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "cache", r.text  # the family's and the layout's refusal
        assert "allowed: first_block, dbcache, none" in err["message"], err
        r = client.post("/v1/videos", json={**BODY, "num_frames": 5, "cache": {"method": "first_block"},
                                            "colour": "red"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "colour", r.text
        assert client.get("/v1/videos").json()["data"] == []  # no job made
    assert len(field_checks) == 3
