"""The ``/v1/images/edits`` edge on a stub orchestrator (no stages): the form's parts and caps, the streaming read,
the rules of the model, the request it becomes, auth, and the OpenAPI document of every route."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from http_stub_server import StubOrchestrator
from image_bytes import png

from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.edit_requests import EditRules, parse_edit_request
from omni_runtime.runtime.multipart_form import FormError, FormLimits, read_form
from omni_runtime.runtime.requests import MAX_SEED, RequestError
from omni_runtime.runtime.server import API_MODULES, create_app

ROUTE = "/v1/images/edits"
KEY = {"Authorization": "Bearer sk-test"}


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory) -> Path:
    from omni_runtime.stages.models.family import family_for_class

    return family_for_class("FluxKontextPipeline").make_tiny(tmp_path_factory.mktemp("kontext") / "m", "tiny")


def _client(model: Path, **server) -> TestClient:
    cfg = config_from_dict({"model": {"path": str(model)}, "server": {
        "port": 0, "api_key": "sk-test", "max_edit_images": 2, "max_edit_image_bytes": 20000, **server}})
    client = TestClient(create_app(cfg, StubOrchestrator()), headers=KEY)
    client.stub = client.app.state  # the orchestrator is set at startup
    return client


@pytest.fixture(scope="module")
def client(kontext_dir):
    with _client(kontext_dir) as c:
        yield c


def test_a_valid_form_becomes_one_request_with_its_image(client) -> None:
    r = client.post(ROUTE, files=[("image", ("a.png", png(56, 40), "image/png"))],
                    data={"prompt": "x", "n": "2", "seed": "11", "num_inference_steps": "3", "guidance_scale": "2.5",
                          "true_cfg_scale": "1.5", "negative_prompt": "y", "output_format": "webp"})
    assert r.status_code == 200, r.text
    assert [d["seed"] for d in r.json()["data"]] == [11, 12]
    req = client.app.state.orch.seen[-1]
    assert (req.width, req.height, req.n, req.num_inference_steps, req.guidance_scale, req.true_cfg_scale) == \
        (48, 32, 2, 3, 2.5, 1.5)  # size absent: auto, 56x40 rounded down to 16
    assert req.images == (png(56, 40),) and req.negative_prompt == "y" and req.output_format == "webp"


@pytest.mark.parametrize(("files", "data", "status", "param", "says"), [
    ([("image", ("a.png", png(32, 32), "image/png")), ("image[]", ("b.png", png(32, 32), "image/png"))], {}, 400,
     "image", "not both"),
    ([("image", ("a.png", png(32, 32), "image/png")), ("mask", ("m.png", png(32, 32), "image/png")),
      ("mask", ("n.png", png(32, 32), "image/png"))], {}, 400, "mask", "at most one mask"),
    ([("image", ("a.png", png(8, 40), "image/png"))], {}, 400, "image", "both sides at least 16 pixels"),
    ([], {}, 400, "image", "image is required"),
    ([("image", ("a.png", png(32, 32), "image/png"))], {"n": "11"}, 400, "n", "between 1 and 10"),
    ([("image", ("a.png", png(32, 32), "image/png"))], {"seed": str(MAX_SEED + 1)}, 400, "seed", "between"),
    ([("image", ("a.png", png(32, 32), "image/png"))], {"guidance_scale": "lots"}, 400, "guidance_scale",
     "must be a number"),
    ([("image", ("a.png", png(32, 32), "image/png"))], {"response_format": "url"}, 400, "response_format",
     "only 'b64_json'"),
    ([("image", ("a.png", png(32, 32), "image/png"))], {"size": "auto "}, 200, None, ""),
    ([("image", ("a.png", png(32, 32), "image/png"))], {"prompt": "p" * (70 << 10)}, 413, "prompt", "over 65536"),
    ([("image", ("a.png", png(32, 32), "image/png"))] * 4, {}, 400, "image", "more than 3 files"),
])
def test_bad_forms_name_the_part(client, files, data, status, param, says) -> None:
    if files:
        r = client.post(ROUTE, files=files, data={"prompt": "x", **data})
    else:  # a form of text fields only
        r = client.post(ROUTE, content=b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n',
                        headers={**KEY, "content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == status, r.text
    if status != 200:
        err = r.json()["error"]
        assert err["param"] == param and says in err["message"], err
    assert client.get("/health").status_code == 200


def test_auth_and_media_type(client) -> None:
    r = client.post(ROUTE, files=[("image", ("a.png", png(32, 32), "image/png"))], data={"prompt": "x"},
                    headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    r = client.post(ROUTE, json={"prompt": "x", "image": "a.png"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_a_model_that_does_not_edit_says_so(tiny_dir) -> None:
    with _client(tiny_dir) as c:
        r = c.post(ROUTE, files=[("image", ("a.png", png(32, 32), "image/png"))], data={"prompt": "x"})
    assert r.status_code == 400, r.text
    assert "the model (FluxPipeline) does not edit images" in r.json()["error"]["message"]


def test_the_form_is_read_streaming_and_stops_at_the_first_part_over_its_cap() -> None:
    sent = []

    async def body():
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(1000):  # 64 MiB if it were all read
            sent.append(1)
            yield b"\0" * 65536

    with pytest.raises(FormError, match="image: the file is over 100000 bytes") as e:
        asyncio.run(read_form(body(), b"b", FormLimits(max_files=2, max_file_bytes=100000)))
    assert e.value.status == 413 and len(sent) == 2  # stopped in the second chunk, not after the 1000th

    async def cut():
        yield b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhello'

    with pytest.raises(FormError, match="ended before its closing boundary"):
        asyncio.run(read_form(cut(), b"b", FormLimits(max_files=1, max_file_bytes=10)))


def test_edit_rules_size_auto_and_the_family_limits() -> None:
    rules = EditRules(model="FluxKontextPipeline", family_images=1, inpainting=False, max_images=4)
    req = parse_edit_request({"prompt": "x", "size": "auto"}, [png(100, 37)], rules)
    assert (req.width, req.height) == (96, 32)
    with pytest.raises(RequestError, match=r"2 images; allowed: at most 1 \(what FluxKontextPipeline takes\)"):
        parse_edit_request({"prompt": "x"}, [png(32, 32)] * 2, rules, image_param="image[]")
    with pytest.raises(RequestError, match="the model .* has no inpainting") as e:
        parse_edit_request({"prompt": "x"}, [png(32, 32)], rules, mask=png(32, 32))
    assert e.value.param == "mask"
    with pytest.raises(RequestError, match="bogus: unknown field"):
        parse_edit_request({"prompt": "x", "bogus": 1}, [png(32, 32)], rules, allow_unknown=False)


def test_openapi_documents_every_route_with_its_bounds(client) -> None:
    spec = client.get("/openapi.json").json()
    assert [m.__name__.rsplit(".", 1)[-1] for m in API_MODULES][:3] == ["images_api", "edits_api", "ops_api"]
    for path in ("/v1/images/generations", ROUTE, "/v1/requests/{request_id}", "/v1/models", "/health", "/metrics",
                 "/v1/loras"):
        assert path in spec["paths"], path
    op = spec["paths"][ROUTE]["post"]
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    props = form["properties"]
    assert form["required"] == ["prompt"]
    assert (props["seed"]["minimum"], props["seed"]["maximum"]) == (0, MAX_SEED)  # exact, not a float
    assert (props["n"]["minimum"], props["n"]["maximum"]) == (1, 10)
    assert props["image"]["maxLength"] == 20000 and props["image[]"]["maxItems"] == 2
    assert props["size"]["default"] == "auto" and "auto" in props["size"]["pattern"]
    assert {"400", "401", "413", "415", "429", "503", "504"} <= set(op["responses"])
    assert op["security"] == [{"bearer": []}]


def test_an_unreadable_model_directory_is_a_500_in_the_error_body(tmp_path) -> None:
    with _client(tmp_path / "not-a-model") as c:
        r = c.post(ROUTE, files=[("image", ("a.png", png(32, 32), "image/png"))], data={"prompt": "x"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
        assert "model.path" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200


def test_a_form_takes_the_cache_and_lora_fields_as_json_text(client) -> None:
    """The form's ``cache`` object and ``lora`` list arrive as JSON text, as the video form takes them (they were
    refused as "must be an object" / "a list" before)."""
    image = [("image", ("a.png", png(32, 32), "image/png"))]
    r = client.post(ROUTE, files=image, data={"prompt": "x", "cache": '{"method": "first_block", "threshold": 0.2}'})
    assert r.status_code == 200, r.text
    req = client.app.state.orch.seen[-1]
    assert (req.cache.method, req.cache.threshold) == ("first_block", 0.2)
    r = client.post(ROUTE, files=image, data={"prompt": "x", "lora": '[{"name": "style", "scale": 0.5}]'})
    assert r.status_code == 200, r.text  # (the orchestrator resolves the name: the stub takes any)
    assert [(x.name, x.scale) for x in client.app.state.orch.seen[-1].lora] == [("style", 0.5)]
    for text in ("{not json", '"first_block"'):
        r = client.post(ROUTE, files=image, data={"prompt": "x", "cache": text})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache", r.text
    assert client.get("/health").status_code == 200
