"""``[stages.denoiser] compile = true`` (``stages.compile``): torch.compile of the transformer's blocks, through
``serve``.

One served instance of the default layout with ``compile = true`` (warm-up size 64x64) returns, for a seed, the
image the uncompiled runtime returns (in process) and diffusers' FluxPipeline returns, max |delta| <= 2/255; a
request of 3 images (3 rows: the warm-up ran 1 and 2) and one of another size (64x128: another sequence length)
compile no new graph (counted from the server's ``denoiser compile: graph N`` log lines). A parallel layout
returns the default layout's image, for a 2-image request and a true-CFG one: Ulysses 2 with HSDP 2 on the same 2
ranks (the attention's all-to-all runs eager between a block's graphs; HSDP's all-gathers run around the compiled
blocks, as hooks) and CFG parallel with layer pipeline parallelism (cfg 2 x pp 2: 4 ranks, each compiling the blocks
of its pipeline stage).
Their servers start (and compile) in the background while the default layout's test runs.
Bad values of the two keys are ConfigErrors naming the key and the allowed values; PipeFusion is refused by name.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from test_server_harness import ROOT, Server

from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.stages.compile import RECOMPILE_LIMIT

pytestmark = [pytest.mark.slow]

PROMPT, STEPS, TOL = "a red fox in the snow", 3, 2
COMPILE = '[stages.denoiser]\ncompile = true\ncompile_warmup = ["64x64"]\n'
MODEL = ROOT / "models" / "tiny-flux"
CACHE = {"method": "first_block", "threshold": 0.5}  # skips steps at 3 steps on the tiny model


def _post(server: Server, size: str, n: int, seed: int, **fields: object) -> dict:
    body = {"prompt": PROMPT, "size": size, "n": n, "seed": seed, "num_inference_steps": STEPS, **fields}
    r = httpx.post(server.url + "/v1/images/generations", json=body, headers=server.headers, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def _decode(answer: dict) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in answer["data"]]


def _images(server: Server, size: str, n: int, seed: int, **fields: object) -> list[np.ndarray]:
    return _decode(_post(server, size, n, seed, **fields))


def _graphs(server: Server) -> int:
    """Graphs the server's denoiser rank(s) compiled so far (one log line each)."""
    return len(re.findall(r"denoiser compile: graph \d+ compiled", server.log_text()))


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


#: the parallel layouts served compiled: name -> (base config, edits of it, lines its log shows when its ranks ran it)
LAYOUTS = {
    "sp2_hsdp2": ("sp2_hsdp2.toml", {}, ["attention eager (sequence parallel)",
                                         "HSDP: FluxTransformer sharded over [0, 1]"]),
    "cfg2_pp2": ("cfg2.toml", {"pp = 1": 'pp = 2\npp_mode = "layer"'},
                 ["CFG parallel over 2 ranks", "pipeline stage 1/2"]),
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Server]:
    """The compiled default layout. Once it is warm (its graph count is then what the test checks), the compiled
    servers of the selected :data:`LAYOUTS` start in the background, one at a time (:func:`layout_server`): their
    starts and warm-ups, the file's longest, overlap the default layout's test."""
    server = Server(tmp_path_factory.mktemp("compiled"), edits={"[stages.denoiser]\n": COMPILE}, timeout=900)
    pool = ThreadPoolExecutor(1)  # one start at a time: each compiles on the same 2 cores
    selected = {item.name for item in request.session.items}
    server.layouts = {  # type: ignore[attr-defined]
        name: pool.submit(Server, tmp_path_factory.mktemp(name), base_config=base, timeout=900,
                          edits={"[stages.denoiser]\n": COMPILE, **edits})
        for name, (base, edits, _) in LAYOUTS.items()
        if f"test_compiled_layout_matches_the_default_layout[{name}]" in selected}
    try:
        yield server
    finally:
        servers = [server]
        for started in server.layouts.values():  # type: ignore[attr-defined]
            try:
                servers.append(started.result())
            except Exception:  # noqa: BLE001 (a start that failed stopped what it started; its test says why)
                pass
        pool.shutdown()
        for s in servers:
            s.stop()
        for s in servers:
            assert s.shm_entries() == []


def _uncompiled(requests: list[tuple[str, int, dict]]) -> list[np.ndarray]:
    """The uncompiled runtime's image of each (size, seed, other fields), in process (one model load)."""
    from omni_runtime.runtime import Omni

    with Omni(config_from_dict({"model": {"path": str(MODEL)}}), in_process=True) as omni:
        return [np.asarray(omni.generate(PROMPT, seed=s, size=size, num_inference_steps=STEPS, **fields)[0])
                for size, s, fields in requests]


def _diffusers(requests: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """diffusers' image of each (seed, height, width) (one pipeline load)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for seed, height, width in requests:
        img = pipe(prompt=PROMPT, height=height, width=width, num_inference_steps=STEPS, guidance_scale=3.5,
                   max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(seed),
                   output_type="np").images
        out.append((img[0] * 255).round().astype("uint8"))
    return out


@pytest.mark.timeout(900)
def test_compiled_serve_matches_uncompiled_and_diffusers_without_recompiling(compiled: Server) -> None:
    log = compiled.log_text()
    assert "compile warm-up: 1 size(s)" in log and "blocks share 2 compiled forward(s)" in log, log[-3000:]
    warm = _graphs(compiled)
    assert 2 <= warm <= 2 * RECOMPILE_LIMIT, log[-3000:]  # 2 block classes x (1 row, several rows)
    three = _images(compiled, "64x64", 3, seed=5)  # 3 rows: the warm-up ran 1 and 2
    wide = _images(compiled, "128x64", 1, seed=8)  # another sequence length (32 image tokens, not 16)
    answer = _post(compiled, "64x64", 1, seed=9, cache=CACHE)  # the cache's per-row decisions around the blocks
    assert answer["cache"]["cached_steps"] == 1, answer["cache"]  # as uncompiled: the same step is skipped
    cached = _decode(answer)
    assert _graphs(compiled) == warm, compiled.log_text()[-3000:]
    want = _uncompiled([("64x64", 5, {}), ("64x64", 6, {}), ("64x64", 7, {}), ("128x64", 8, {}),
                        ("64x64", 9, {"cache": CACHE})])
    for got, ref in zip([*three, *wide, *cached], want, strict=True):
        assert _diff(got, ref) <= TOL
    for got, ref in zip([three[0], wide[0]], _diffusers([(5, 64, 64), (8, 64, 128)]), strict=True):
        assert _diff(got, ref) <= TOL


@pytest.mark.timeout(900)
@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_compiled_layout_matches_the_default_layout(compiled: Server, layout: str) -> None:
    served = compiled.layouts[layout].result()  # type: ignore[attr-defined]
    cfg = {"negative_prompt": "blurry", "true_cfg_scale": 2.0}  # true CFG (under cfg 2: one branch per rank)
    want = _images(compiled, "64x64", 2, seed=11) + _images(compiled, "64x64", 1, seed=17, **cfg)
    got = _images(served, "64x64", 2, seed=11) + _images(served, "64x64", 1, seed=17, **cfg)
    log = served.log_text()
    for line in [*LAYOUTS[layout][2], "denoiser compile: graph"]:
        assert line in log, (line, log[-3000:])
    for a, b in zip(got, want, strict=True):
        assert _diff(a, b) <= TOL


@pytest.mark.parametrize(("table", "match"), [
    ({"compile": "yes"}, r"stages\.denoiser\.compile = .yes. \(str\): must be true or false"),
    ({"compile_warmup": ["big"]}, r"stages\.denoiser\.compile_warmup.*'big' is not a size; allowed: a list of "
                                  r"'WIDTHxHEIGHT'"),
    ({"compile_warmup": "64x64"}, r"stages\.denoiser\.compile_warmup"),
    ({"compile": True, "parallel": {"pp": 2, "pp_mode": "pipefusion"}},
     r"compile = true with stages\.denoiser\.parallel\.pp_mode = 'pipefusion': PipeFusion.*allowed: compile = "
     r"false, or pp_mode = 'layer'"),
])
def test_bad_compile_keys_name_the_key_and_the_allowed_values(table: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model": {"path": str(MODEL)}, "stages": {"denoiser": table}})

