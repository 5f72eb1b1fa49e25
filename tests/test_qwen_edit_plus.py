"""Qwen-Image-Edit Plus (``QwenImageEditPlusPipeline``, the tiny model, several input images) through ``serve`` with
the official ``openai`` client against diffusers' ``QwenImageEditPlusPipeline(image=[a, b], prompt=..., width=W,
height=H)`` (max |diff| <= 2/255); the images' order conditions the result; too many images is a 400 naming the
field; and ``size = auto`` of both edit families is the pipelines' default output size (no server).

One server (2 edits at 48x32, 2 steps); the two inputs (56x40 and 32x48 noise) are encoded at 1216x864 and 832x1248.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from image_bytes import decode_b64, png
from openai import OpenAI
from qwen_edit_refs import edit, pipeline
from test_server_harness import API_KEY, ROOT, at_once, serving

from omni_runtime.runtime.config_load import load_config
from omni_runtime.runtime.edit_requests import edit_rules, parse_edit_request
from omni_runtime.runtime.model_store import ensure_model

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]  # 1024x1024-area encodes on CPU

MODEL = ROOT / "models" / "tiny-qwen-image-edit-plus"
PROMPT = "make the cat blue"
SIZE = "48x32"
FIELDS = {"seed": 7, "num_inference_steps": 2}
CAPS = {'path = "../models/tiny-qwen-image-edit"': 'path = "../models/tiny-qwen-image-edit-plus"',
        "max_edit_images = 1": "max_edit_images = 4"}


A = png(56, 40)
B = png(32, 48, seed=1)


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape == (32, 48, 3), (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return edit(pipeline(ensure_model(str(MODEL))), [A, B], PROMPT, SIZE, **FIELDS)


@pytest.fixture(scope="module")
def server(tmp_path_factory, reference):
    with serving(tmp_path_factory.mktemp("qwen-edit-plus"), base_config="qwen_image_edit.toml", edits=CAPS) as s:
        yield s


@pytest.fixture(scope="module")
def served(server) -> dict[str, np.ndarray]:
    """The edit of [A, B] and of [B, A], sent at once by the official client."""
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)

    def run(images: list[bytes]) -> np.ndarray:
        files = [(f"{i}.png", data, "image/png") for i, data in enumerate(images)]
        r = client.images.edit(model="tiny-qwen-image-edit-plus", image=files, prompt=PROMPT, size=SIZE,  # type: ignore
                               extra_body=FIELDS)
        return decode_b64(r.data[0].b64_json)

    return dict(zip(("ab", "ba"), at_once(run, [([A, B],), ([B, A],)]), strict=True))


def test_served_plus_edit_equals_diffusers(served, reference) -> None:
    assert _diff(served["ab"], reference) <= 2


def test_the_images_order_conditions_the_result(served) -> None:
    assert _diff(served["ab"], served["ba"]) > 4


def test_too_many_images_is_400_naming_the_field(server, served) -> None:
    files = [("image[]", (f"{i}.png", A, "image/png")) for i in range(5)]
    r = httpx.post(server.url + "/v1/images/edits", headers=server.headers, files=files,
                   data={"prompt": PROMPT, "size": SIZE}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "image[]" and "at most 4" in err["message"], err
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


@pytest.mark.parametrize("model", ["tiny-qwen-image-edit", "tiny-qwen-image-edit-plus"])
def test_size_auto_is_the_pipelines_default(tmp_path, model) -> None:
    """Edit: calculate_dimensions(1024*1024, ratio) of the (first) image; Plus: of the LAST image."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    text = (ROOT / "configs" / "qwen_image_edit.toml").read_text().replace(
        'path = "../models/tiny-qwen-image-edit"', f'path = "{ROOT / "models" / model}"').replace(
        "max_edit_images = 1", "max_edit_images = 4")
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    rules = edit_rules(load_config(cfg))
    plus = model.endswith("plus")
    images = [A, B] if plus else [B]
    req = parse_edit_request({"prompt": PROMPT, "size": "auto"}, images, rules)
    w, h = calculate_dimensions(1024 * 1024, 32 / 48)  # B's ratio
    assert (req.width, req.height) == (w, h) == (832, 1248)
    if not plus:
        with pytest.raises(Exception, match="at most 1"):
            parse_edit_request({"prompt": PROMPT}, [A, B], rules)


def test_a_request_without_images_batches_apart_and_is_refused_alone() -> None:
    """The text encoder sees the images: an item without any (a generation) never shares an edit's batch, and its
    batch is refused naming ``image``; the edit's batch encodes."""
    from omni_runtime.runtime.requests import parse_request
    from omni_runtime.stages.engine import StageItem, TextEncoderEngine
    from omni_runtime.stages.errors import RequestError

    engine = TextEncoderEngine.load(ensure_model(str(MODEL)), "float32", "cpu")
    gen = StageItem(params=parse_request({"prompt": PROMPT}), seed=0)
    edit_req = parse_request({"prompt": PROMPT})
    edit_item = StageItem(params=type(edit_req)(**{**{f: getattr(edit_req, f) for f in edit_req.__struct_fields__},
                                                   "images": (A, B)}), seed=0)
    assert engine.batch_key(gen) != engine.batch_key(edit_item)
    with pytest.raises(RequestError, match="image is required"):
        engine.step([gen])
    (out,) = engine.step([edit_item])
    assert out["prompt_embeds"].dim() == 2 and out["prompt_embeds"].shape[0] > 2 * 4  # the vision tokens stay
