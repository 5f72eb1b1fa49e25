"""Mixed image sizes through ``omni-runtime serve`` (``[stages.denoiser] mixed_sizes = true``; real processes, the
official openai client): a 256x256 and a 272x208 request, and a true-CFG request with a plain one of another size,
share denoising steps (the padding waste metric shows each of their shared forwards), and every image equals the
same request's solo run through the same server (uint8 within 1, i.e. 1/255).

The configs to run under: ``OMNI_MIXED_TEST_CONFIGS`` (comma-separated file names in configs/, default
``default.toml,cfg2.toml``: one rank, and CFG parallel over 2 ranks, which splits the padded rows, their ``img_ids``
and key padding masks by row).
"""

from __future__ import annotations

import os

import pytest
from test_server_harness import Server
from test_step_serving import _gen, _in_thread, _join, _metric, _same, step_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]

CONFIGS = os.environ.get("OMNI_MIXED_TEST_CONFIGS", "default.toml,cfg2.toml").split(",")
STEPS = 8


@pytest.fixture(scope="module", params=CONFIGS)
def server(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    path = step_config(tmp, request.param, scheduling="step", mixed_sizes=True, max_padding_waste=0.25)
    s = Server(tmp, base_config=str(path), timeout=300)
    yield s
    assert s.proc.poll() is None, "the server died during the module"
    s.stop()
    assert s.leftover == []  # the server was running, so stop() counted its stage processes


def _shared_steps(server, waste: float, run) -> float:
    """How many steps had padding waste ``waste`` (a forward of exactly the rows expected) while ``run`` ran."""
    before = _metric(server, "omni_denoiser_step_padding_waste_sum")
    run()
    after = _metric(server, "omni_denoiser_step_padding_waste_sum")
    k = (after - before) / waste
    assert abs(k - round(k)) < 1e-3, (after - before, waste)  # only forwards of these rows were padded
    return round(k)


def _together_then_solo(server, bodies: list[dict], waste: float) -> None:
    got: list = []

    def run() -> None:
        threads = [_in_thread(_gen, server, b) for b in bodies]
        got.extend(_join(t, box) for t, box in threads)

    shared = _shared_steps(server, waste, run)
    assert shared >= 1, shared  # the sizes met in at least one forward
    for body, img in zip(bodies, got, strict=True):
        solo = _gen(server, body)
        _same(img, solo, body["size"])
    assert _shared_steps(server, waste, lambda: None) == 0


def test_256x256_and_272x208_share_forwards_and_each_equals_its_solo_run(server):
    bodies = [{"prompt": "a square", "seed": 1, "size": "256x256", "num_inference_steps": STEPS},
              {"prompt": "a portrait", "seed": 2, "size": "272x208", "num_inference_steps": STEPS}]
    _together_then_solo(server, bodies, waste=35 / 512)  # 256 and 17 x 13 = 221 image tokens


def test_true_cfg_and_plain_request_of_different_sizes_each_equal_their_solo_runs(server):
    bodies = [{"prompt": "with guidance", "seed": 3, "size": "272x208", "num_inference_steps": STEPS,
               "negative_prompt": "blurry", "true_cfg_scale": 3.0},
              {"prompt": "plain", "seed": 4, "size": "256x256", "num_inference_steps": STEPS}]
    _together_then_solo(server, bodies, waste=70 / 768)  # rows 221, 221 (cfg) and 256
