"""A denoiser replica of sequence-parallel ranks (Ulysses 2; Ulysses 2 x Ring 2), through ``serve``, returns the
single-rank in-process (Omni(in_process=True)) images of two requests that run inside the step-level running set
of a long third one; no process of either instance listens on a non-loopback address (issue 14 #3, the check of
tests/test_placement.py, on these servers rather than one of its own)."""

from __future__ import annotations

import numpy as np
import pytest
from stage_refs import single_rank_config
from test_placement import assert_listens_on_loopback_only
from test_server_harness import Server, images_together

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(300)]

CARRIER = {"prompt": "a long walk", "seed": 1, "size": "64x64", "num_inference_steps": 200}
REQUESTS = [{"prompt": "a castle on a hill", "seed": 21, "size": "64x64", "num_inference_steps": 3},
            {"prompt": "a red cube", "seed": 5, "size": "64x64", "num_inference_steps": 2,
             "negative_prompt": "blurry", "true_cfg_scale": 4.0}]
PROOF = {"sp2.toml": "sequence parallel over 2 ranks", "usp4.toml": "sequence parallel over 4 ranks"}


@pytest.mark.parametrize("config, ranks", [("sp2.toml", 2), ("usp4.toml", 4)])
def test_sequence_parallel_serve_matches_in_process_pipeline(tmp_path, config, ranks):
    from omni_runtime.runtime import Omni

    server = Server(tmp_path, base_config=config)
    try:
        titles = sorted(" ".join(p.cmdline()).strip() for p in server.stage_procs())
        assert titles == [f"omni-runtime: denoiser[0] rank {r}/{ranks}" for r in range(ranks)] + [
            "omni-runtime: text_encoder[0] rank 0/1", "omni-runtime: vae[0] rank 0/1"]

        served = images_together(server, CARRIER, REQUESTS)  # both join a long request's running set
        log = server.log_text()
        assert f"denoiser[0] rank {ranks - 1}/{ranks}" in log  # the follower ranks log with their prefix
        assert PROOF[config] in log, log[-3000:]  # the denoiser really sharded (stages logs it)
        assert_listens_on_loopback_only(server)
    finally:
        server.stop()
    assert server.shm_entries() == []
    with Omni(single_rank_config(server.config_path), in_process=True) as omni:
        refs = [np.asarray(omni.generate(b["prompt"], **{k: v for k, v in b.items() if k != "prompt"})[0])
                for b in REQUESTS]
    for got, ref in zip(served, refs, strict=True):
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
