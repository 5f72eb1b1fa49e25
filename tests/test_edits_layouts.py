"""Image edits (FLUX.1-Kontext) in the parallel layouts through ``serve``: the condition tokens are sharded with the
image tokens (Ulysses), split with their rows (CFG parallel), carried through the pipeline stages (PP) and run on
sharded weights (HSDP); the VAE's encode runs whole on every patch rank (VAE patch). Each layout's edits equal the
default layout's, which equals diffusers' ``FluxKontextPipeline`` (tests/test_edits_serving.py): here both are
compared with diffusers directly (max |diff| <= 2/255). PipeFusion is refused by name.

One server per layout, two concurrent edits each (64x64, 3 steps): one plain, one with true CFG (two branches).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from image_bytes import decode_b64
from stage_refs import diffusers_pipeline
from test_edits_serving import INPUT, MODEL, PROMPT, kontext_edit
from test_server_harness import (
    PIPEFUSION,
    assert_logged,
    config_text,
    denoiser_layout,
    post_together,
    serving,
)

from omni_runtime.runtime.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]

SIZE = 64
EDITS = [{"seed": 3, "num_inference_steps": 3},
         {"seed": 4, "num_inference_steps": 3, "negative_prompt": "blurry", "true_cfg_scale": 3.0}]

# layout -> (config edits, what the server's log shows when the ranks really ran it)
LAYOUTS = {
    "ulysses2": (denoiser_layout(ulysses=2), ["sequence parallel over 2 ranks"]),
    "cfg2": (denoiser_layout(cfg=2), ["CFG parallel over 2 ranks"]),
    "pp2": (denoiser_layout(pp=2), ["pipeline stage 1/2 holds blocks"]),
    "hsdp2": (denoiser_layout(hsdp_shard=2), ["HSDP: FluxTransformer sharded over [0, 1]"]),
    "vae_patch2": ({"[stages.vae.parallel]\npatch = 1": "[stages.vae.parallel]\npatch = 2"},
                   ["vae[0] rank 1/2"]),
}


@pytest.fixture(scope="module")
def references() -> list[np.ndarray]:
    pipe = diffusers_pipeline("FluxKontextPipeline", MODEL)
    return [kontext_edit(pipe, SIZE, SIZE, fields["seed"], **{k: v for k, v in fields.items() if k != "seed"})
            for fields in EDITS]


def _serve(tmp: Path, edits: dict[str, str], logged: list[str]) -> list[np.ndarray]:
    with serving(tmp, base_config="flux_kontext.toml", edits=edits) as server:
        out = post_together(server, "/v1/images/edits", [
            {"data": {"prompt": PROMPT, "size": f"{SIZE}x{SIZE}", **{k: str(v) for k, v in fields.items()}},
             "files": [("image", ("in.png", INPUT, "image/png"))]} for fields in EDITS])
        assert_logged(server, logged)
        return [decode_b64(r.json()["data"][0]["b64_json"]) for r in out]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_edits_equal_diffusers(tmp_path, references, layout: str) -> None:
    edits, logged = LAYOUTS[layout]
    served = _serve(tmp_path, edits, logged)
    for ours, ref in zip(served, references, strict=True):
        assert ours.shape == ref.shape == (SIZE, SIZE, 3)
        assert int(np.abs(ours.astype(int) - ref.astype(int)).max()) <= 2, layout


def test_pipefusion_is_refused_by_name(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text("flux_kontext.toml", PIPEFUSION))
    assert main(["check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "stages.denoiser.parallel.pp_mode = 'pipefusion': the flux-kontext family (FluxKontextPipeline) does not " \
           "support pipefusion" in err, err
