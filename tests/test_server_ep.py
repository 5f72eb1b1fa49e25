"""The MoE tiny model through ``serve``: a denoiser with ``ep = 2`` returns the image of ``ep = 1`` (max |d| <= 1/255)
for each CPU-capable all2all backend, and each EP rank holds only its experts' parameters (counted in its log)."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from make_tiny_model import main as make_tiny_main
from PIL import Image
from test_server_harness import ROOT, Server

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]

BODY = {"prompt": "a castle on a hill", "seed": 21, "size": "64x64", "num_inference_steps": 2}
EXPERT_LOG = re.compile(r"denoiser\[0\] rank (\d)/2 .*expert parallel rank (\d)/2, (\d+) expert parameters of (\d+)")


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "tiny-moe"
    assert make_tiny_main([str(out), "--moe-experts", "4", "--moe-top-k", "2"]) == 0
    return out


def _config(tmp: Path, model: Path, parallel: str) -> str:
    text = (ROOT / "configs" / "default.toml").read_text()
    text = text.replace('path = "../models/tiny-flux"', f'path = "{model}"')
    text = re.sub(r"\[stages\.denoiser\.parallel\]\n(.*\n)*?\n", f"[stages.denoiser.parallel]\n{parallel}\n\n", text)
    path = tmp / "base.toml"
    path.write_text(text)
    return str(path)  # absolute: Server's ROOT / "configs" / base_config resolves to it


def _serve(tmp: Path, model: Path, parallel: str) -> tuple[np.ndarray, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    server = Server(tmp, base_config=_config(tmp, model, parallel))
    try:
        r = httpx.post(server.url + "/v1/images/generations", json=BODY, headers=server.headers, timeout=180)
        assert r.status_code == 200, r.text
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
        log = server.log_text()
    finally:
        server.stop()
    assert server.shm_entries() == []
    return image, log


@pytest.fixture(scope="module")
def ep1_image(moe_model: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    image, log = _serve(tmp_path_factory.mktemp("ep1"), moe_model, "ulysses = 1\nep = 1")
    assert "expert parallel rank" not in log
    return image


def _expert_params(model: Path) -> tuple[int, int]:
    from omni_runtime.stages.models.flux.transformer import FluxTransformer

    full = FluxTransformer.from_pretrained(model)
    return (sum(p.numel() for n, p in full.named_parameters() if ".experts." in n),
            sum(p.numel() for p in full.parameters()))


@pytest.mark.parametrize("backend,ulysses", [("naive", 1), ("agrs", 1), ("alltoallv", 1), ("alltoallv", 2)])
def test_ep2_serve_matches_ep1(moe_model: Path, ep1_image: np.ndarray, tmp_path: Path, backend: str,
                               ulysses: int) -> None:
    image, log = _serve(tmp_path, moe_model, f'ulysses = {ulysses}\ndp = {2 // ulysses}\nep = 2\n'
                                                 f'all2all_backend = "{backend}"')
    diff = np.abs(image.astype(int) - ep1_image.astype(int))
    assert diff.max() <= 1, (backend, ulysses, diff.max())
    experts, total = _expert_params(moe_model)
    seen = {int(m.group(1)): (int(m.group(2)), int(m.group(3)), int(m.group(4))) for m in EXPERT_LOG.finditer(log)}
    assert sorted(seen) == [0, 1], log[-3000:]
    for rank, (ep_rank, held, in_all) in seen.items():
        assert ep_rank == rank
        assert held * 2 == experts  # half the experts on each rank ...
        assert in_all == total - experts // 2  # ... and nothing else missing
