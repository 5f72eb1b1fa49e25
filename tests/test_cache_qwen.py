"""First-Block Cache on Qwen-Image (issue 26) through ``Omni(in_process=True)`` (the ``cache=`` keyword, the same
engines as ``serve``) equals diffusers' QwenImagePipeline with ``apply_first_block_cache`` on the tiny Qwen-Image
directory, with true CFG (each branch its own state, diffusers' ``cache_context``): the images (<= 2/255) and the
number of skipped (step, branch) forwards, at a threshold where some are skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stage_refs import diffusers_pipeline, first_block_cache_skips

THRESHOLD = 0.3
REQUEST = {"prompt": "two grey cats asleep on a sofa", "negative_prompt": "blurry", "true_cfg_scale": 3.0,
           "num_inference_steps": 8}
SEED, WIDTH, HEIGHT = 5, 64, 48


def _diffusers(path) -> tuple[np.ndarray, int]:
    pipe = diffusers_pipeline("QwenImagePipeline", path)
    skipped = first_block_cache_skips(pipe.transformer, pipe.transformer.transformer_blocks[0], THRESHOLD)
    img = pipe(**REQUEST, width=WIDTH, height=HEIGHT, output_type="pil",
               generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(img).astype(int), sum(skipped)


@pytest.mark.slow
def test_qwen_first_block_equals_diffusers(qwen_tiny_dir):
    from omni_runtime.runtime import Omni
    from omni_runtime.runtime.config_load import config_from_dict

    ref, ref_skipped = _diffusers(qwen_tiny_dir)
    assert ref_skipped >= 2, "the threshold skips no step: the test would prove nothing"
    with Omni(config_from_dict({"model": {"path": str(qwen_tiny_dir)}}), in_process=True) as omni:
        img = omni.generate(**REQUEST, size=f"{WIDTH}x{HEIGHT}", seed=SEED,
                            cache={"method": "first_block", "threshold": THRESHOLD})[0]
        plain = omni.generate(**REQUEST, size=f"{WIDTH}x{HEIGHT}", seed=SEED)[0]
    stats = img.info["cache"]
    assert stats["cached_steps"] == ref_skipped and stats["steps"] == 2 * REQUEST["num_inference_steps"]
    assert np.abs(np.asarray(img.convert("RGB")).astype(int) - ref).max() <= 2
    assert "cache" not in plain.info
