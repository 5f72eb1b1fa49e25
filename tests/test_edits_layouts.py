"""Image edits (FLUX.1-Kontext) in the parallel layouts through ``serve``: the condition tokens are sharded with the
image tokens (Ulysses), split with their rows (CFG parallel), carried through the pipeline stages (PP) and run on
sharded weights (HSDP); the VAE's encode runs whole on every patch rank (VAE patch). Each layout's edits equal the
default layout's, which equals diffusers' ``FluxKontextPipeline`` (tests/test_edits_serving.py): here both are
compared with diffusers directly (max |diff| <= 2/255). PipeFusion is refused by name.

One server per layout, two concurrent edits each (64x64, 3 steps): one plain, one with true CFG (two branches).
"""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from test_edits_serving import INPUT, MODEL, PROMPT
from test_server_harness import ROOT, Server

from omni_runtime.runtime.cli import main
from omni_runtime.runtime.model_store import ensure_model

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]

SIZE = 64
EDITS = [{"seed": 3, "num_inference_steps": 3},
         {"seed": 4, "num_inference_steps": 3, "negative_prompt": "blurry", "true_cfg_scale": 3.0}]
PARALLEL = "[stages.denoiser.parallel]\nulysses = 1\nring = 1\ncfg = 1\npp = 1\nhsdp_shard = 1"


def _denoiser(**degrees: int) -> dict[str, str]:
    text = PARALLEL
    for key, value in degrees.items():
        text = text.replace(f"{key} = 1", f"{key} = {value}", 1)
    return {PARALLEL: text}


# layout -> (config edits, what the server's log shows when the ranks really ran it)
LAYOUTS = {
    "ulysses2": (_denoiser(ulysses=2), ["sequence parallel over 2 ranks"]),
    "cfg2": (_denoiser(cfg=2), ["CFG parallel over 2 ranks"]),
    "pp2": (_denoiser(pp=2), ["pipeline stage 1/2 holds blocks"]),
    "hsdp2": (_denoiser(hsdp_shard=2), ["HSDP: FluxTransformer sharded over [0, 1]"]),
    "vae_patch2": ({"[stages.vae.parallel]\npatch = 1": "[stages.vae.parallel]\npatch = 2"},
                   ["vae[0] rank 1/2"]),
}


@pytest.fixture(scope="module")
def references() -> list[np.ndarray]:
    import torch
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(str(ensure_model(str(MODEL))), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for fields in EDITS:
        kw = {k: v for k, v in fields.items() if k != "seed"}
        out.append(np.asarray(pipe(image=Image.open(io.BytesIO(INPUT)).convert("RGB"), prompt=PROMPT, height=SIZE,
                                   width=SIZE, max_area=SIZE * SIZE, _auto_resize=False, **kw,
                                   generator=torch.Generator("cpu").manual_seed(fields["seed"])).images[0]))
    return out


def _serve(tmp: Path, edits: dict[str, str], logged: list[str]) -> list[np.ndarray]:
    server = Server(tmp, base_config="flux_kontext.toml", edits=edits)
    try:
        out: list = [None] * len(EDITS)

        def post(i: int) -> None:
            data = {"prompt": PROMPT, "size": f"{SIZE}x{SIZE}", **{k: str(v) for k, v in EDITS[i].items()}}
            out[i] = httpx.post(server.url + "/v1/images/edits", headers=server.headers, data=data,
                                files=[("image", ("in.png", INPUT, "image/png"))], timeout=200)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(EDITS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in out:
            assert r is not None and r.status_code == 200, (r.text if r is not None else "no answer",
                                                           server.log_text()[-3000:])
        log = server.log_text()
        for line in logged:
            assert line in log, (line, log[-3000:])
        return [np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))) for r in out]
    finally:
        server.stop()
        assert server.shm_entries() == []


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_edits_equal_diffusers(tmp_path, references, layout: str) -> None:
    edits, logged = LAYOUTS[layout]
    served = _serve(tmp_path, edits, logged)
    for ours, ref in zip(served, references, strict=True):
        assert ours.shape == ref.shape == (SIZE, SIZE, 3)
        assert int(np.abs(ours.astype(int) - ref.astype(int)).max()) <= 2, layout


def test_pipefusion_is_refused_by_name(tmp_path, capsys) -> None:
    text = (ROOT / "configs" / "flux_kontext.toml").read_text().replace(
        'path = "../models/', f'path = "{ROOT / "models"}/').replace("pp = 1", 'pp = 2\npp_mode = "pipefusion"')
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    assert main(["check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "stages.denoiser.parallel.pp_mode = 'pipefusion': the flux-kontext family (FluxKontextPipeline) does not " \
           "support pipefusion" in err, err
