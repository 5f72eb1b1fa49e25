"""``POST /v1/images/edits`` through ``serve`` (configs/flux_kontext.toml, the tiny FLUX.1-Kontext model) with the
official ``openai`` client, against diffusers' ``FluxKontextPipeline(image=img, prompt=..., height=H, width=W,
max_area=W*H, _auto_resize=False)`` (max |diff| <= 2/255 on PNG pixels); then every bad input over the same server
(4xx naming the field, the server healthy and serving afterwards).

One server for the module. The input image is 56x40 noise (encoded at 48x32, its size rounded down to 16).
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from image_bytes import decode_b64, png
from openai import BadRequestError, OpenAI
from PIL import Image
from stage_refs import diffusers_pipeline
from test_server_harness import API_KEY, ROOT, Server, at_once, serving

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]

MODEL = ROOT / "models" / "tiny-flux-kontext"
CAPS = {"max_edit_images = 1": "max_edit_images = 2", "max_edit_image_bytes = 16777216": "max_edit_image_bytes = "
        "300000", "max_edit_image_pixels = 16777216": "max_edit_image_pixels = 40000"}
# name -> (the form's fields, the diffusers call's keywords besides image/prompt/size/seed)
EDITS = {
    "plain": ({"size": "64x48", "seed": 7, "num_inference_steps": 3}, {"num_inference_steps": 3}),
    "true_cfg": ({"size": "64x48", "seed": 5, "num_inference_steps": 3, "negative_prompt": "blurry",
                  "true_cfg_scale": 2.0, "guidance_scale": 2.5},
                 {"num_inference_steps": 3, "negative_prompt": "blurry", "true_cfg_scale": 2.0, "guidance_scale": 2.5}),
    "auto": ({"size": "auto", "seed": 9, "num_inference_steps": 2}, {"num_inference_steps": 2}),
}
PROMPT = "make the cat blue"


INPUT = png(56, 40)


def _size(fields: dict) -> tuple[int, int]:
    return (48, 32) if fields["size"] == "auto" else tuple(int(v) for v in fields["size"].split("x"))  # type: ignore


def kontext_edit(pipe, width: int, height: int, seed: int, **kw) -> np.ndarray:
    """diffusers' ``FluxKontextPipeline`` edit of INPUT with PROMPT at exactly ``width`` x ``height``: the reference
    of a served edit."""
    import torch

    return np.asarray(pipe(image=Image.open(io.BytesIO(INPUT)).convert("RGB"), prompt=PROMPT, height=height,
                           width=width, max_area=width * height, _auto_resize=False,
                           generator=torch.Generator("cpu").manual_seed(seed), **kw).images[0])


@pytest.fixture(scope="module")
def references() -> dict[str, np.ndarray]:
    pipe = diffusers_pipeline("FluxKontextPipeline", MODEL)
    return {name: kontext_edit(pipe, *_size(fields), fields["seed"], **kw) for name, (fields, kw) in EDITS.items()}


@pytest.fixture(scope="module")
def server(tmp_path_factory, references):
    with serving(tmp_path_factory.mktemp("edits"), base_config="flux_kontext.toml", edits=CAPS) as s:
        yield s


@pytest.fixture(scope="module")
def served(server) -> dict[str, np.ndarray]:
    """Every edit of EDITS sent at once (they share the denoiser's running set) by the official client."""
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)

    def edit(name: str) -> np.ndarray:
        fields = dict(EDITS[name][0])
        size = fields.pop("size")
        r = client.images.edit(model="tiny-flux-kontext", image=("in.png", INPUT, "image/png"), prompt=PROMPT,
                               size=size, extra_body=fields)  # type: ignore[arg-type]
        return decode_b64(r.data[0].b64_json)

    return dict(zip(EDITS, at_once(edit, [(name,) for name in EDITS]), strict=True))


@pytest.mark.parametrize("name", sorted(EDITS))
def test_served_edit_equals_diffusers_kontext(served, references, name) -> None:
    ours, ref = served[name], references[name]
    w, h = _size(EDITS[name][0])
    assert ours.shape == ref.shape == (h, w, 3)
    assert int(np.abs(ours.astype(int) - ref.astype(int)).max()) <= 2


def test_the_input_image_conditions_the_result(server, served) -> None:
    """The same prompt and seed without the image (a generation on the same model) is another image."""
    r = httpx.post(server.url + "/v1/images/generations", headers=server.headers, timeout=120,
                   json={"prompt": PROMPT, "size": "64x48", "seed": 7, "num_inference_steps": 3})
    assert r.status_code == 200, r.text
    assert int(np.abs(decode_b64(r.json()["data"][0]["b64_json"]).astype(int) - served["plain"].astype(int)).max()) > 4


def _post(server: Server, files: list, data: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(server.url + "/v1/images/edits", headers=server.headers, files=files,
                      data={"prompt": PROMPT, "num_inference_steps": "1", **(data or {})}, timeout=120, **kw)


NOISE_400 = png(400, 400, seed=1)  # > 300000 bytes
FLAT_256 = png(np.full((256, 256, 3), 128, dtype=np.uint8))  # 65536 pixels > 40000, few bytes
BAD = {
    "not_an_image": ([("image", ("x.png", b"this is not a png", "image/png"))], {}, 400, "image",
                     "not an image file"),
    "too_many_images": ([("image[]", ("a.png", INPUT, "image/png")), ("image[]", ("b.png", INPUT, "image/png"))],
                        {}, 400, "image[]", "at most 1 (what FluxKontextPipeline takes)"),
    "no_image": ([("other", ("a.png", INPUT, "image/png"))], {}, 400, "other", "unknown file field"),
    "mask_other_size": ([("image", ("a.png", INPUT, "image/png")), ("mask", ("m.png", FLAT_256, "image/png"))], {},
                        400, "mask", "pixels"),
    "mask_size_differs": ([("image", ("a.png", INPUT, "image/png")),
                           ("mask", ("m.png", png(np.zeros((40, 48, 3), np.uint8)), "image/png"))], {}, 400, "mask",
                          "it must have the first image's size 56x40"),
    "mask_no_inpainting": ([("image", ("a.png", INPUT, "image/png")), ("mask", ("m.png", INPUT, "image/png"))], {},
                           400, "mask", "has no inpainting"),
    "bytes_cap": ([("image", ("big.png", NOISE_400, "image/png"))], {}, 413, "image",
                  "allowed: at most 300000"),
    "pixel_cap": ([("image", ("flat.png", FLAT_256, "image/png"))], {}, 400, "image",
                  "256x256 = 65536 pixels; allowed: at most 40000 ([server] max_edit_image_pixels)"),
    "bad_seed": ([("image", ("a.png", INPUT, "image/png"))], {"seed": "seven"}, 400, "seed", "must be an integer"),
    "bad_size": ([("image", ("a.png", INPUT, "image/png"))], {"size": "65x48"}, 400, "size", "multiple of 16"),
    "no_prompt": ([("image", ("a.png", INPUT, "image/png"))], {"prompt": ""}, 400, "prompt", "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_4xx_naming_the_field(server, served, case) -> None:
    files, data, status, param, says = BAD[case]
    r = _post(server, files, data)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err


def test_a_body_that_is_not_multipart_is_415_and_the_server_serves_on(server, served) -> None:
    for kw in ({"json": {"prompt": PROMPT}}, {"content": b"image=x", "headers": {
            **server.headers, "content-type": "application/x-www-form-urlencoded"}}):
        r = httpx.post(server.url + "/v1/images/edits", **{"headers": server.headers, **kw}, timeout=30)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    r = httpx.post(server.url + "/v1/images/edits", headers={**server.headers, "content-type":
                   "multipart/form-data; boundary=xyz"}, content=b"--xyz\r\nnonsense", timeout=30)
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"], r.text
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    with pytest.raises(BadRequestError, match="not an image file"):
        client.images.edit(image=("x.png", b"GIF89a nope", "image/png"), prompt=PROMPT)
    r = client.images.edit(image=("in.png", INPUT, "image/png"), prompt=PROMPT, size="64x48",  # type: ignore
                           extra_body={k: v for k, v in EDITS["plain"][0].items() if k != "size"})
    assert int(np.abs(decode_b64(r.data[0].b64_json).astype(int) - served["plain"].astype(int)).max()) <= 2
