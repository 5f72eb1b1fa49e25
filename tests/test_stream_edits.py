"""Streamed image edits (``stream`` and ``partial_images`` as form fields of ``POST /v1/images/edits``) through
``serve`` (configs/flux_kontext.toml, the tiny FLUX.1-Kontext model): the official ``openai`` client iterates
``image_edit.partial_image`` / ``image_edit.completed`` events unmodified, the completed image equals the same edit
without streaming (<= 2/255), and bad form values are 400 naming the field. One server for the module."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from image_bytes import decode_b64, png
from openai import OpenAI
from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent
from test_server_harness import API_KEY, serving

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]

PROMPT = "make the cat blue"
FIELDS = {"seed": 7, "num_inference_steps": 6}


INPUT = png(64, 48)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("stream-edits"), base_config="flux_kontext.toml") as s:
        yield s


def test_official_client_streams_an_edit_and_the_final_equals_the_unstreamed_edit(server) -> None:
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    image = ("in.png", INPUT, "image/png")
    events = list(client.images.edit(image=image, prompt=PROMPT, size="64x48", stream=True, partial_images=2,
                                     extra_body=FIELDS))
    assert [type(e) for e in events] == [ImageEditPartialImageEvent] * 2 + [ImageEditCompletedEvent], events
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(e.size == "64x48" and decode_b64(e.b64_json).shape == (48, 64, 3) for e in events)
    plain = client.images.edit(image=image, prompt=PROMPT, size="64x48", extra_body=FIELDS)
    final = decode_b64(events[-1].b64_json)
    assert int(np.abs(final.astype(int) - decode_b64(plain.data[0].b64_json).astype(int)).max()) <= 2
    assert int(np.abs(final.astype(int) - decode_b64(events[0].b64_json).astype(int)).max()) > 2  # a real preview


@pytest.mark.parametrize(("data", "param", "says"), [
    ({"stream": "true", "partial_images": "9"}, "partial_images", "from 0 to 3"),
    ({"stream": "maybe"}, "stream", "allowed values are true, false"),
    ({"partial_images": "1"}, "partial_images", "only with stream=true"),
])
def test_bad_stream_form_fields_are_400_naming_the_field(server, data, param, says) -> None:
    r = httpx.post(server.url + "/v1/images/edits", headers=server.headers, timeout=60,
                   files=[("image", ("in.png", INPUT, "image/png"))], data={"prompt": PROMPT, **data})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
