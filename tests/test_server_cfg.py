"""CFG parallel through ``serve``: cfg2.toml (cfg 2) and cfg2_usp2.toml (cfg 2 x ulysses 2, 4 denoiser ranks).

Through the official openai client, each config returns for a seed the image the default config (one denoiser
rank) returns, max |delta| <= 1/255: a true-CFG request (negative prompt, true_cfg_scale = 4), a request without a
negative branch (data parallel over the cfg ranks), and a true-CFG 272x208 request (17 x 13 = 221 image tokens:
odd, so Ulysses pads). A cfg rank SIGKILLed mid-request fails the request with a 503 naming the stage and the
rank; the replica restarts and the next request succeeds.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from test_server_harness import API_KEY, ROOT, Server, image_of, post_and_kill

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PROMPT, NEGATIVE = "a castle on a hill", "blurry, low quality"
#: (size, steps, extra body): with and without true CFG, and one odd-token size
REQUESTS = [
    ("64x64", 3, {"negative_prompt": NEGATIVE, "true_cfg_scale": 4.0}),
    ("64x64", 3, {}),
    ("272x208", 2, {"negative_prompt": NEGATIVE, "true_cfg_scale": 4.0}),
]
SERVED = {
    "cfg2.toml": (["denoiser[0] rank 0/2", "denoiser[0] rank 1/2", "text_encoder[0] rank 0/1", "vae[0] rank 0/1"],
                  {"CFG parallel over 2 ranks (cfg rank 0)": 1, "CFG parallel over 2 ranks (cfg rank 1)": 1,
                   "sequence parallel over": 0}),
    "cfg2_usp2.toml": ([f"denoiser[0] rank {r}/4" for r in range(4)] + ["text_encoder[0] rank 0/1",
                                                                       "vae[0] rank 0/1"],
                       {"CFG parallel over 2 ranks (cfg rank 0)": 2, "CFG parallel over 2 ranks (cfg rank 1)": 2,
                        "sequence parallel over 2 ranks": 4}),
}


def _generate(url: str, seed: int, size: str, steps: int, extra: dict) -> np.ndarray:
    from openai import OpenAI
    from PIL import Image

    client = OpenAI(base_url=url + "/v1", api_key=API_KEY)
    out = client.images.generate(model="tiny-flux", prompt=PROMPT, n=1, size=size, response_format="b64_json",
                                 extra_body={"seed": seed, "num_inference_steps": steps, **extra})
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))))


def _run_all(server: Server) -> tuple[list[np.ndarray], str, list[str]]:
    titles = sorted(" ".join(p.cmdline()).strip().removeprefix("omni-runtime: ") for p in server.stage_procs())
    images = [_generate(server.url, 21 + i, size, steps, extra) for i, (size, steps, extra) in enumerate(REQUESTS)]
    return images, server.log_text(), titles


def _serve_all(tmp: Path, config: str) -> tuple[list[np.ndarray], str, list[str]]:
    server = Server(tmp, base_config=config)
    try:
        return _run_all(server)
    finally:
        server.stop()
        assert server.shm_entries() == []


@pytest.fixture(scope="module")
def cfg2_server(tmp_path_factory: pytest.TempPathFactory):
    """One cfg2.toml server for the comparison with the default config and then the SIGKILL test (in this order:
    the comparison counts the log lines of the first generation of ranks)."""
    server = Server(tmp_path_factory.mktemp("cfg2"), base_config="cfg2.toml")
    yield server
    server.stop()
    assert server.shm_entries() == []


@pytest.fixture(scope="module")
def default_images(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    images, _, titles = _serve_all(tmp_path_factory.mktemp("default"), "default.toml")
    assert titles == ["denoiser[0] rank 0/1", "text_encoder[0] rank 0/1", "vae[0] rank 0/1"]
    return images


@pytest.mark.timeout(600)
@pytest.mark.parametrize("config", sorted(SERVED))
def test_served_cfg_parallel_matches_the_default_config(tmp_path: Path, config: str, request: pytest.FixtureRequest,
                                                        default_images: list[np.ndarray]) -> None:
    assert (ROOT / "configs" / config).exists()
    if config == "cfg2.toml":  # the server the SIGKILL test then uses
        images, log, titles = _run_all(request.getfixturevalue("cfg2_server"))
        assert "(generation 2)" not in log, "the SIGKILL test ran first on the shared cfg2 server"
    else:
        images, log, titles = _serve_all(tmp_path, config)
    want_titles, proofs = SERVED[config]
    assert titles == sorted(want_titles)
    for line, count in proofs.items():
        assert log.count(line) == count, (line, log[-3000:])
    for (size, _, extra), got, want in zip(REQUESTS, images, default_images, strict=True):
        w, h = map(int, size.split("x"))
        assert got.shape == want.shape == (h, w, 3)
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1, (config, size, extra, diff.max(), (diff > 0).mean())


@pytest.mark.timeout(400)
def test_sigkill_of_a_cfg_rank_gives_503_naming_it_then_recovers(cfg2_server: Server) -> None:
    """cfg rank 1 dies mid-request (rank 0 waits for its predictions in the step's all-gather): the request fails
    fast with a 503 naming the denoiser and the rank, the replica restarts, and the next request succeeds."""

    server = cfg2_server
    victim = [p for p in server.stage_procs() if "denoiser[0] rank 1/2" in " ".join(p.cmdline())]
    assert len(victim) == 1
    after_body = {"prompt": "after the crash", "negative_prompt": "x", "true_cfg_scale": 4, "seed": 1,
                  "size": "64x64", "num_inference_steps": 2}
    before = image_of(server, after_body)
    r, after_kill = post_and_kill(server, victim[0], {
        "prompt": "slow", "negative_prompt": "fast", "true_cfg_scale": 4, "seed": 3, "size": "512x512",
        "num_inference_steps": 200})
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "denoiser" in message and "rank 1" in message, message
    assert "rank 1 died" in r.json()["error"]["message"], r.text  # from the death, not the stall watch
    assert np.array_equal(image_of(server, after_body), before)  # the restarted replica: the same image
    assert "denoiser[0] ready (generation 2)" in server.log_text()


@pytest.mark.timeout(400)
def test_batch_cli_on_cfg2_matches_the_default_pipeline(tmp_path: Path) -> None:
    """``omni-runtime batch`` (stage processes) on cfg2.toml: a true-CFG line and a line of n = 2 without a
    negative prompt (two requests, split over the cfg ranks when the driver batches them) give the default pipeline's
    images."""
    import json

    from PIL import Image

    from omni_runtime.runtime import Omni
    from omni_runtime.runtime.cli import main

    lines = [{"prompt": PROMPT, "negative_prompt": NEGATIVE, "true_cfg_scale": 4.0, "seed": 5, "size": "64x48",
              "num_inference_steps": 3},
             {"prompt": "a boat", "n": 2, "seed": 8, "size": "64x64", "num_inference_steps": 3}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    assert main(["batch", "--config", str(ROOT / "configs" / "cfg2.toml"), str(prompts), "--out-dir", str(out)]) == 0
    with Omni(ROOT / "configs" / "default.toml", in_process=True) as omni:
        refs = {"00001.png": omni.generate(**lines[0])[0]}
        refs.update(zip(("00002-0.png", "00002-1.png"), omni.generate(**lines[1]), strict=True))
    assert sorted(p.name for p in out.glob("*.png")) == sorted(refs)
    for name, ref in refs.items():
        diff = np.abs(np.asarray(Image.open(out / name)).astype(int) - np.asarray(ref).astype(int))
        assert diff.max() <= 1, (name, diff.max())
