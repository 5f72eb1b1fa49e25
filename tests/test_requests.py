"""Request validation (HTTP body, CLI flags) without stage processes: the HTTP app runs on a stub orchestrator."""

from __future__ import annotations

import base64
import json
import math
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from http_stub_server import StubOrchestrator

from omni_runtime.runtime.cli import main
from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.requests import MAX_SEED, RequestError, parse_request
from omni_runtime.runtime.server import create_app

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = str(ROOT / "configs" / "default.toml")


@pytest.fixture()
def client():
    cfg = config_from_dict({"model": {"path": "/nowhere/tiny-flux"}, "server": {"api_key": "sk-test"}})
    stub = StubOrchestrator()
    with TestClient(create_app(cfg, stub), headers={"Authorization": "Bearer sk-test"}) as c:
        c.stub = stub
        yield c


@pytest.mark.parametrize("body, param, says", [
    ({"prompt": "x", "n": True}, "n", "n=True: must be an integer between 1 and 10"),
    ({"prompt": "x", "num_inference_steps": False}, "num_inference_steps", "must be an integer"),
    ({"prompt": "x", "guidance_scale": math.nan}, "guidance_scale", "guidance_scale=nan: must be a number"),
    ({"prompt": "x", "guidance_scale": math.inf}, "guidance_scale", "guidance_scale=inf: must be between 0 and 100"),
    ({"prompt": "x", "true_cfg_scale": -math.inf}, "true_cfg_scale", "must be between 1 and 100"),
    ({"prompt": "x", "seed": -1}, "seed", "seed=-1: must be between 0 and 9223372036854775798"),
    ({"prompt": "x", "seed": 2**63}, "seed", "seed=9223372036854775808: must be between 0 and"),
    ({"prompt": "x", "seed": MAX_SEED + 1}, "seed", "must be between 0 and 9223372036854775798"),
    ({"prompt": "x\ud800"}, "prompt", "prompt: character 1 is a lone UTF-16 surrogate"),
    ({"prompt": "x", "negative_prompt": "\udfff"}, "negative_prompt", "lone UTF-16 surrogate"),
    ({"prompt": "x", "size": "0016x16"}, "size", "no leading zeros"),
    ({"prompt": "x", "size": "16x16\n"}, "size", "must be 'WIDTHxHEIGHT'"),  # the schema's pattern refuses it too
    ({"prompt": "x", "model": 3}, "model", "model=3: must be a string"),
    ({"prompt": "x", "seed": 1.5}, "seed", "must be an integer"),
    ({"prompt": {"text": "x"}}, "prompt", "must be a string"),
    ({"prompt": "x", "size": {"w": 16, "h": 16}}, "size", "must be a string 'WIDTHxHEIGHT'"),
    ({"prompt": "x", "size": "16x16x16"}, "size", "must be 'WIDTHxHEIGHT'"),
    ({"prompt": "x", "size": "-16x16"}, "size", "must be 'WIDTHxHEIGHT'"),
    ({"prompt": "x", "size": "2064x16"}, "size", "width 2064 must be a multiple of 16 between 16 and 2048"),
    ({"prompt": "x", "size": "16x24"}, "size", "height 24 must be a multiple of 16"),
    ({"prompt": "x", "output_format": ["png"]}, "output_format", "allowed values are png, jpeg, webp"),
    ({"prompt": "x", "response_format": {"a": 1}}, "response_format", "only 'b64_json' is supported"),
    ({"prompt": "   "}, "prompt", "prompt is empty"),
    ({"n": 1}, "prompt", "prompt is required"),
    ({"prompt": "x", "negative_prompt": "y" * 4001}, "negative_prompt", "has 4001 characters: at most 4000"),
])
def test_bad_field_names_the_field_value_and_allowed(body, param, says):
    with pytest.raises(RequestError) as e:
        parse_request(body)
    assert e.value.param == param and says in str(e.value), str(e.value)


def test_huge_values_are_not_echoed_back():
    with pytest.raises(RequestError) as e:
        parse_request({"prompt": "x", "size": "1" * 100_000})
    assert e.value.param == "size" and len(str(e.value)) < 200 and "(100002 characters)" in str(e.value)


def test_defaults_openai_extras_and_seed_rule():
    req = parse_request({"prompt": "p", "model": "dall-e-3", "quality": "hd", "style": "vivid", "user": "u",
                         "response_format": "b64_json", "size": " 64X32 ", "n": 3, "seed": 5})
    assert (req.width, req.height, req.n, req.seeds()) == (64, 32, 3, [5, 6, 7])
    assert (req.num_inference_steps, req.guidance_scale, req.true_cfg_scale, req.output_format) == (
        28, 3.5, 1.0, "png")
    assert parse_request({"prompt": "p", "model": "m"}, allow_unknown=False).prompt == "p"
    with pytest.raises(RequestError, match="^steps: unknown field") as e:  # JSONL lines are strict about names
        parse_request({"prompt": "p", "steps": 3}, allow_unknown=False)
    assert e.value.param == "steps"


@pytest.mark.parametrize("content, param, code", [
    ("{not json", None, "invalid_json"),
    ("[" * 50_000, None, "invalid_json"),  # nested too deep for the parser: still the client's mistake
    ("[1, 2]", None, "invalid_request"),
    ('"a prompt"', None, "invalid_request"),
    ("null", None, "invalid_request"),
    ('{"prompt": "x", "guidance_scale": NaN}', "guidance_scale", "invalid_request"),
    ('{"prompt": "x", "n": 1e400}', "n", "invalid_request"),
    ('{"prompt": "x", "seed": ' + "9" * 30 + "}", "seed", "invalid_request"),
    ('{"prompt": "x", "size": "' + "9" * 10_000 + '"}', "size", "invalid_request"),
    ("\xff\xfe", None, "invalid_json"),
])
def test_http_malformed_bodies_are_400_openai_errors(client, content, param, code):
    r = client.post("/v1/images/generations", content=content.encode("latin-1"),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["type"], err["code"]) == (param, "invalid_request_error", code)
    assert len(err["message"]) < 300
    assert client.stub.seen == []


def test_http_huge_body_is_413_and_server_keeps_serving(client):
    r = client.post("/v1/images/generations", json={"prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = client.post("/v1/images/generations", json={"prompt": "a fox", "n": 2, "seed": 7, "model": "dall-e-3",
                                                    "response_format": "b64_json", "output_format": "webp"})
    assert r.status_code == 200
    body = r.json()
    assert [base64.b64decode(d["b64_json"]) for d in body["data"]] == [b"a fox:7", b"a fox:8"]
    assert isinstance(body["created"], int) and client.stub.seen[0].output_format == "webp"


def test_http_auth_routes(client):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
        r = client.post("/v1/images/generations", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers=headers).status_code == 401
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-flux"
    assert client.get("/health").json() == {"status": "ok", "stages": client.stub.health()}
    assert "/v1/images/generations" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    metrics = client.get("/metrics").text
    assert 'omni_requests_total{status="401"} 3.0' in metrics
    assert client.stub.seen == []


@pytest.mark.parametrize("argv, says", [
    (["serve", DEFAULT, "--port", "abc"], "--port: 'abc': must be an integer between 0 and 65535"),
    (["serve", DEFAULT, "--port", "70000"], "--port: 70000: must be between 0 and 65535"),
    (["--log-level", "loud", "check", DEFAULT], "--log-level: 'loud': allowed values are DEBUG"),
    (["generate", "--config", DEFAULT, "--prompt", "x", "--steps", "two", "-o", "x.png"], "--steps"),
    (["generate", "--config", DEFAULT, "--prompt", "x"], "-o/--output"),
])
def test_cli_flag_errors_exit_2_from_argparse(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["check", str(ROOT)], "cannot read it (Is a directory)"),
    (["check", str(ROOT / "missing.toml")], "cannot read it (No such file or directory)"),
    (["generate", "--config", DEFAULT, "--prompt", "x", "--steps", "-1", "--in-process", "-o", "x.png"],
     "num_inference_steps=-1: must be between 1 and 200"),
    (["generate", "--config", DEFAULT, "--prompt", "x", "--size", "17x17", "--in-process", "-o", "x.png"],
     "size='17x17': width 17 must be a multiple of 16"),
    (["generate", "--config", DEFAULT, "--prompt", "x", "--guidance", "nan", "--in-process", "-o", "x.png"],
     "guidance_scale=nan"),
    (["generate", "--config", DEFAULT, "--prompt", "x", "--in-process", "-o", "x.gif"],
     "the suffix must be one of .png"),
    (["generate", "--config", DEFAULT, "--prompt", "x", "--steps", "201", "--in-process", "-o", "x.png"],
     "num_inference_steps=201: must be between 1 and 200"),
    (["generate", "--config", DEFAULT, "--prompt", "x", "--size", "2048x2048", "--steps", "100", "--in-process",
      "-o", "x.png"], "1 x 2048 x 2048 x 100 = 419430400: at most 67108864 is allowed ([server] max_pixels_steps)"),
    (["generate", "--config", DEFAULT, "--prompt", "x\udc80", "--in-process", "-o", "x.png"],
     "lone UTF-16 surrogate"),
    (["batch", "--config", DEFAULT, str(ROOT / "missing.jsonl"), "--out-dir", "o", "--in-process"],
     "missing.jsonl': cannot read it (No such file or directory)"),
    (["batch", "--config", DEFAULT, str(ROOT), "--out-dir", "o", "--in-process"], "cannot read it (Is a directory)"),
])
def test_cli_value_errors_exit_2_with_one_line(argv, says, capsys, tmp_path, monkeypatch):
    # The request's defaults are the model family's, so the CLI reads the model before it validates: the embedded
    # default model is made here first (on a fresh clone its progress bar would otherwise be in ``err``).
    from omni_runtime.runtime.model_store import ensure_model

    ensure_model(str(ROOT / "models" / "tiny-flux"))
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written, no model loaded


def test_cli_flags_come_from_the_request_table(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "num_inference_steps: an integer from 1 to 200, default 28" in out
    assert "guidance_scale: a number from 0 to 100, default 3.5" in out
    assert "seed: an integer from 0 to 9223372036854775798" in out


def test_batch_line_errors_name_the_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n\n" + '{"prompt": "x", "n": 0}\n')
    assert main(["batch", "--config", DEFAULT, str(prompts), "--out-dir", str(tmp_path / "o"), "--in-process"]) == 2
    assert "p.jsonl line 3: n=0: must be between 1 and 10" in capsys.readouterr().err
    prompts.write_text('{"prompt": "ok"}\n{"prompt": "x",\n')
    assert main(["batch", "--config", DEFAULT, str(prompts), "--out-dir", str(tmp_path / "o"), "--in-process"]) == 2
    assert "p.jsonl line 2: " in capsys.readouterr().err
    prompts.write_text('{"prompt": "ok"}\n{"prompt": "big", "n": 2, "size": "2048x2048"}\n')
    assert main(["batch", "--config", DEFAULT, str(prompts), "--out-dir", str(tmp_path / "o"), "--in-process"]) == 2
    assert "p.jsonl line 2: n x width x height = 2 x 2048 x 2048 = 8388608 pixels: at most 4194304" in \
        capsys.readouterr().err
    prompts.write_text('{"prompt": "ok"}\n' + "[" * 50_000 + "\n")
    assert main(["batch", "--config", DEFAULT, str(prompts), "--out-dir", str(tmp_path / "o"), "--in-process"]) == 2
    assert "p.jsonl line 2: not valid JSON: nested too deeply" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_serve_on_a_busy_port_fails_at_once_before_any_stage(capsys):
    import socket
    import time

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        assert main(["serve", DEFAULT, "--port", str(port)]) == 2
        assert time.monotonic() - t0 < 5  # no stage was started (that takes ~10 s on the tiny model)
    err = capsys.readouterr().err
    assert f"server.host = '127.0.0.1', server.port = {port}: cannot listen there (Address already in use)" in err
    assert main(["serve", DEFAULT, "--host", "no.such.host.invalid", "--port", "0"]) == 2
    assert "server.host = 'no.such.host.invalid'" in capsys.readouterr().err


def test_http_maps_serving_errors_to_openai_bodies(client):
    from omni_runtime.runtime.orchestrator import DeadlineExceeded, Overloaded, StageUnavailable

    raised = [Overloaded("stage denoiser queue is full", retry_after=3),
              StageUnavailable("stage denoiser[0] died"), DeadlineExceeded("deadline of 600 s passed"),
              ZeroDivisionError("a bug")]

    async def failing(req, request_id=None, report=None):
        raise raised.pop(0)

    client.stub.generate = failing
    got = []
    for _ in range(4):
        r = client.post("/v1/images/generations", json={"prompt": "x"})
        err = r.json()["error"]
        got.append((r.status_code, r.headers.get("retry-after"), err["type"], err["code"], err["message"]))
    assert got == [
        (429, "3", "rate_limit_error", "queue_full", "stage denoiser queue is full"),
        (503, None, "server_error", "stage_unavailable", "stage denoiser[0] died"),
        (504, None, "timeout_error", "deadline_exceeded", "deadline of 600 s passed"),
        (500, None, "server_error", "internal_error", "internal error: ZeroDivisionError: a bug"),
    ]
    metrics = client.get("/metrics").text
    for status in ("429", "503", "504", "500"):
        assert f'omni_requests_total{{status="{status}"}} 1.0' in metrics
    assert 'omni_errors_total{kind="internal_error",stage="http"} 1.0' in metrics


def test_serve_returns_1_with_one_line_when_the_stages_never_become_ready(monkeypatch, caplog):
    from omni_runtime.runtime import server
    from omni_runtime.runtime.orchestrator import StageUnavailable

    class NeverReady(StubOrchestrator):
        def __init__(self, cfg, metrics) -> None:
            super().__init__()

        async def start(self) -> None:
            raise StageUnavailable("stage vae: vae[0] rank 0 exited with code 1 while starting")

    monkeypatch.setattr(server, "Orchestrator", NeverReady)
    monkeypatch.setitem(sys.modules, "setproctitle", None)  # keep pytest's own process title
    cfg = config_from_dict({"model": {"path": "/nowhere/tiny-flux"}, "server": {"port": 0}})
    assert server.serve(cfg) == 1  # was uvicorn's SystemExit(3)
    assert "not serving: the stage processes did not become ready" in caplog.text
