"""Qwen-Image-Edit (``QwenImageEditPipeline``, configs/qwen_image_edit.toml, the tiny model) through ``serve`` with
the official ``openai`` client, in the default layout and in ulysses 2 (the condition tokens sharded with the rest),
cfg 2 (true CFG with a negative prompt, one branch per rank), pp 2 and hsdp_shard 2 (the denoiser and the text
encoder, its vision tower included): every layout's edit equals
diffusers' ``QwenImageEditPipeline(image=img, prompt=..., width=W, height=H, negative_prompt=...,
true_cfg_scale=...)`` on the same checkpoint and seed (max |diff| <= 2/255).
Then bad inputs on the default server (400 naming the field, the server serving on) and PipeFusion refused
by name by ``check``.

One request per server (true CFG: both branches run) at 48x32, 2 steps (one step is NaN in diffusers: the
scheduler's shift_terminal divides by zero); the input image (56x40 noise) is encoded at the pipeline's 1216x864
(``calculate_dimensions(1024*1024, 56/40)``), 4104 condition tokens.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from image_bytes import decode_b64, png
from openai import OpenAI
from qwen_edit_refs import edit, pipeline
from test_server_harness import (
    API_KEY,
    PIPEFUSION,
    ROOT,
    Server,
    assert_logged,
    at_once,
    config_text,
    denoiser_layout,
    serving,
)

from omni_runtime.runtime.cli import main
from omni_runtime.runtime.model_store import ensure_model

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]  # 1024x1024-area encodes on CPU

MODEL = ROOT / "models" / "tiny-qwen-image-edit"
PROMPT = "make the cat blue"
SIZE = "48x32"
FIELDS = {"seed": 5, "num_inference_steps": 2, "negative_prompt": "blurry", "true_cfg_scale": 3.0}
CAPS = {"max_edit_images = 1": "max_edit_images = 2"}
TEXT = "[stages.text_encoder]\nreplicas = 1\nmax_batch_size = 8\nbatch_timeout_ms = 0\n"


INPUT = png(56, 40)


# layout -> (config edits, what the server's log shows when the ranks really ran it, ...)
LAYOUTS = {
    "ulysses2": (denoiser_layout(ulysses=2), "sequence parallel over 2 ranks"),
    "cfg2": (denoiser_layout(cfg=2), "CFG parallel over 2 ranks"),
    "pp2": (denoiser_layout(pp=2), "pipeline stage 1/2 holds blocks"),
    # the text encoder sharded too: Qwen2.5-VL's vision tower (its own HSDP unit) runs on sharded weights
    "hsdp2": ({**denoiser_layout(hsdp_shard=2), TEXT: TEXT + "\n[stages.text_encoder.parallel]\nhsdp_shard = 2\n"},
              "HSDP: QwenImageTransformer sharded over [0, 1]", "HSDP: Qwen2_5_VLForConditionalGeneration sharded "
              "over [0, 1]"),
}


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape == (32, 48, 3), (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return edit(pipeline(ensure_model(str(MODEL))), [INPUT], PROMPT, SIZE, **FIELDS)


@pytest.fixture(scope="module")
def server(tmp_path_factory, reference):
    with serving(tmp_path_factory.mktemp("qwen-edit"), base_config="qwen_image_edit.toml", edits=CAPS) as s:
        yield s


def _client_edit(server: Server) -> np.ndarray:
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    r = client.images.edit(model="tiny-qwen-image-edit", image=("in.png", INPUT, "image/png"), prompt=PROMPT,
                           size=SIZE, extra_body=FIELDS)  # type: ignore[arg-type]
    return decode_b64(r.data[0].b64_json)


def test_served_edit_equals_diffusers(server, reference) -> None:
    assert _diff(_client_edit(server), reference) <= 2


def _layout(tmp, layout: str, out: dict) -> None:
    edits, *logged = LAYOUTS[layout]
    with serving(tmp / layout, base_config="qwen_image_edit.toml", edits=edits) as s:
        out[layout] = _client_edit(s)
        assert_logged(s, logged)


@pytest.mark.timeout(900)  # four servers, each encoding the input at 1216x864
def test_layouts_equal_diffusers(tmp_path, reference) -> None:
    """Two layouts' servers at a time (each 2 denoiser ranks), each edit compared with diffusers'."""
    out: dict = {}
    names = sorted(LAYOUTS)
    for pair in (names[:2], names[2:]):
        for name in pair:
            (tmp_path / name).mkdir()
        at_once(_layout, [(tmp_path, name, out) for name in pair])
    assert set(out) == set(LAYOUTS), sorted(out)
    for name in names:
        assert _diff(out[name], reference) <= 2, name


def test_bad_inputs_are_400_naming_the_field(server, reference) -> None:
    two = [("image[]", ("a.png", INPUT, "image/png")), ("image[]", ("b.png", INPUT, "image/png"))]
    r = httpx.post(server.url + "/v1/images/edits", headers=server.headers, files=two,
                   data={"prompt": PROMPT, "size": SIZE}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "image[]" and "at most 1 (what QwenImageEditPipeline takes)" in err["message"], err
    r = httpx.post(server.url + "/v1/images/generations", headers=server.headers, timeout=60,
                   json={"prompt": PROMPT, "size": SIZE, "num_inference_steps": 1})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "image is required" in err["message"] and "POST /v1/images/edits" in err["message"], err
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_pipefusion_is_refused_by_name(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text("qwen_image_edit.toml", PIPEFUSION))
    assert main(["check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "the qwen_image_edit family (QwenImageEditPipeline) does not support pipefusion" in err, err
