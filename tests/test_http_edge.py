"""The HTTP edge on a stub orchestrator: media type, body limit, auth headers, /metrics key, work caps, the
generated schema, and (on the real uvicorn server of ``serve``) chunked bodies and stalled connections."""

from __future__ import annotations

import json
import socket
import time

import pytest
from fastapi.testclient import TestClient
from http_stub_server import StubOrchestrator, ThreadServer, stub_config

from omni_runtime.runtime.http_common import MAX_BODY_BYTES
from omni_runtime.runtime.requests import FIELDS, MAX_SEED, SIZE_PATTERN, WorkCaps, check_work, parse_request
from omni_runtime.runtime.server import create_app
from omni_runtime.runtime.stream_api import STREAM_PROPERTIES

ROUTE = "/v1/images/generations"


@pytest.fixture()
def client():
    cfg = stub_config(api_key="sk-test", metrics_require_key=True)
    stub = StubOrchestrator()
    with TestClient(create_app(cfg, stub), headers={"Authorization": "Bearer sk-test"}) as c:
        c.stub = stub
        yield c


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None, "application/jsonp"])
def test_a_body_not_sent_as_json_is_415(client, content_type):
    # what a cross-site <form enctype="text/plain"> post looks like: a JSON-looking body, no preflight needed
    headers = {} if content_type is None else {"content-type": content_type}
    r = client.post(ROUTE, content=b'{"prompt": "x", "ignore": "="}', headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"
    assert client.stub.seen == []
    r = client.post(ROUTE, content=b'{"prompt": "x"}', headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200 and len(client.stub.seen) == 1


def test_401_says_bearer_and_metrics_can_need_the_key(client):
    r = client.post(ROUTE, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    r = client.get("/metrics", headers={"Authorization": ""})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/metrics").status_code == 200
    open_cfg = stub_config(api_key="sk-test")  # metrics_require_key = false (the default): /metrics is open
    with TestClient(create_app(open_cfg, StubOrchestrator())) as c:
        assert c.get("/metrics").status_code == 200


def test_lone_surrogate_over_http_is_400(client):
    for body in (b'{"prompt": "a \\ud800 b"}', b'{"prompt": "x", "negative_prompt": "\\udc00"}'):
        r = client.post(ROUTE, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert "lone UTF-16 surrogate" in r.json()["error"]["message"]
    assert client.stub.seen == []


def test_work_caps_are_400_naming_the_fields_and_the_limit(client):
    # the probe's request: ~13-15 min of denoiser time on the tiny model
    r = client.post(ROUTE, json={"prompt": "x", "n": 10, "size": "2048x2048", "num_inference_steps": 200})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "size"
    assert "n x width x height = 10 x 2048 x 2048 = 41943040 pixels: at most 4194304" in err["message"]
    r = client.post(ROUTE, json={"prompt": "x", "size": "1024x1024", "num_inference_steps": 65})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "num_inference_steps"
    assert "1 x 1024 x 1024 x 65 = 68157440: at most 67108864 is allowed ([server] max_pixels_steps)" in err["message"]
    assert client.post(ROUTE, json={"prompt": "x", "size": "1024x1024", "num_inference_steps": 64}).status_code == 200
    assert client.post(ROUTE, json={"prompt": "x", "n": 10, "size": "256x256"}).status_code == 200
    assert check_work(parse_request({"prompt": "x", "n": 10, "size": "2048x2048", "num_inference_steps": 200}),
                      WorkCaps()) is None  # 0 = no cap


def test_work_caps_come_from_the_config():
    cfg = stub_config(max_pixels_steps=1000)
    cfg.stages.vae.max_batch_pixels = 32 * 32
    caps = WorkCaps.from_config(cfg)
    assert caps == WorkCaps(max_pixels_steps=1000, max_batch_pixels=1024)
    with pytest.raises(ValueError, match="max_batch_pixels"):
        parse_request({"prompt": "x", "size": "32x48"}, caps=caps)
    with pytest.raises(ValueError, match=r"1 x 16 x 16 x 4 = 1024: at most 1000"):
        parse_request({"prompt": "x", "size": "16x16", "num_inference_steps": 4}, caps=caps)


def test_the_schema_is_the_table(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"][ROUTE]["post"]
    props = op["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert set(props) == set(FIELDS) | set(STREAM_PROPERTIES)  # the table's fields and the stream fields
    assert (props["num_inference_steps"]["minimum"], props["num_inference_steps"]["maximum"]) == (1, 200)
    assert (props["guidance_scale"]["minimum"], props["guidance_scale"]["maximum"]) == (0.0, 100.0)
    assert (props["seed"]["minimum"], props["seed"]["maximum"]) == (0, MAX_SEED)
    assert props["prompt"]["maxLength"] == 4000 and props["size"]["pattern"] == SIZE_PATTERN
    assert {"400", "401", "413", "415", "429", "503", "504"} <= set(op["responses"])
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert op["security"] == [{"bearer": []}]


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_chunked_body_stops_at_the_limit_with_413():
    """A 256 MB chunked body: the server answers 413 after ~1 MiB; the client never has to send the rest."""
    with ThreadServer(stub_config()) as srv, _connect(srv.port) as sock:
        sock.sendall(b"POST " + ROUTE.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))

        def stream():  # a 256 MB generator: counts what it was asked for
            for _ in range(256):
                stream.sent += 1
                yield chunk
        stream.sent = 0
        sock.setblocking(False)
        answer = b""
        for data in stream():
            view = memoryview(data)
            deadline = time.monotonic() + 10
            while view and time.monotonic() < deadline:
                try:
                    answer += sock.recv(65536)
                except BlockingIOError:
                    pass
                if answer:
                    break
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:
                    time.sleep(0.001)
                except OSError:  # reset: the server closed after its answer
                    break
            if answer or view:
                break
        sock.setblocking(True)
        sock.settimeout(5)
        try:
            while b"\r\n\r\n" not in answer:
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
        except OSError:
            pass
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert stream.sent < 32, stream.sent  # stopped within the socket buffers, far from 256
        assert srv.stub.seen == []


def test_declared_length_over_the_limit_is_413_before_reading():
    with ThreadServer(stub_config()) as srv, _connect(srv.port) as sock:
        sock.sendall(b"POST " + ROUTE.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes ``sock`` (reads EOF), or raise if it stays open ``seconds``."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    while True:
        data = sock.recv(65536)
        if not data:
            return time.monotonic() - t0


def test_stalled_connections_are_closed():
    cfg = stub_config(header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_timeout_s=0.5)
    with ThreadServer(cfg) as srv:
        with _connect(srv.port) as silent:  # connects, sends nothing (held 30 s before)
            assert _closed_within(silent, 5) < 3
        with _connect(srv.port) as half_head:  # half a header block, then nothing
            half_head.sendall(b"POST " + ROUTE.encode() + b" HTTP/1.1\r\nHost: x\r\n")
            assert _closed_within(half_head, 5) < 3
        with _connect(srv.port) as half_body:  # complete headers, half the body
            half_body.sendall(b"POST " + ROUTE.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                              b"\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
            assert _closed_within(half_body, 5) < 3
        with _connect(srv.port) as good:  # a complete request still works, then the idle connection closes
            body = json.dumps({"prompt": "ok"}).encode()
            good.sendall(b"POST " + ROUTE.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            good.settimeout(5)
            assert good.recv(65536).startswith(b"HTTP/1.1 200")
            assert _closed_within(good, 5) < 3
        assert [r.prompt for r in srv.stub.seen] == ["ok"]


def test_connection_limit_answers_503():
    with ThreadServer(stub_config(max_connections=2, header_timeout_s=30)) as srv:
        held = [_connect(srv.port), _connect(srv.port)]
        try:
            time.sleep(0.2)
            with _connect(srv.port) as third:
                third.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                third.settimeout(5)
                assert third.recv(65536).startswith(b"HTTP/1.1 503")
        finally:
            for s in held:
                s.close()


def test_usage_lists_the_documented_responses_and_the_keyed_routes_of_the_schema(client):
    """USAGE's list of the generation route's documented responses is the schema's, and its security section names
    every route of the schema that needs the key (it missed 409 and ``GET /v1/requests/{id}``)."""
    import re
    from pathlib import Path

    usage = (Path(__file__).resolve().parent.parent / "docs" / "USAGE.md").read_text()
    schema = client.get("/openapi.json").json()
    codes = sorted(int(c) for c in schema["paths"][ROUTE]["post"]["responses"])
    listed = re.search(r"the documented\s+responses \(([\d, ]+)\)", usage).group(1)
    assert [int(c) for c in listed.split(", ")] == codes
    security = usage[usage.index("## Security model"):]
    security = security[:security.index("\n- **Browsers.**")]
    keyed = [f"{method.upper()} {path}" for path, ops in schema["paths"].items() for method, op in ops.items()
             if op.get("security") and path not in ("/metrics",)]
    assert keyed
    for route in keyed:
        method, path = route.split(" ")
        assert path in security, f"{route} needs the key; USAGE's security section does not name it"
