"""PipeFusion (``parallel/strategies/pipefusion.py``) on real gloo processes, against the exact run.

PipeFusion is an approximation by design (stale K/V of the other patches): the decoded image of pp = 2 with 2
patches, 8 steps and 1 warm-up step is within PSNR >= 30 dB of the single-process image, for a request with and
without true CFG. With warm-up covering every step it is exact (rel <= 1e-5): the synchronous path really runs the
same computation, and the stale path is really taken otherwise (the result differs from the exact one).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from spawn import run_workers  # noqa: E402

from omni_runtime.parallel.parallel_spec import ParallelSpec
from omni_runtime.parallel.strategies.pipefusion import patch_ranges, token_rows

# (prompt, negative prompt or None, seed, height, width, true_cfg_scale)
CASES = [("a photo of a cat", None, 1, 128, 96, 1.0), ("a red cube", "blurry", 4, 128, 96, 4.0)]
MAX_SEQ = 16


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def run_cases(model_dir: str, steps: int, mesh=None, decode: bool = True) -> dict:
    """Denoise CASES with ``steps`` steps on ``mesh``; latents and (rank 0 / one process) decoded images."""
    from stage_refs import encoded_requests

    from omni_runtime.stages import DenoiserStage, TextEncoderStage, VaeDecoderStage

    te = TextEncoderStage.from_pretrained(model_dir, "float32", "cpu")
    den = DenoiserStage.from_pretrained(model_dir, "float32", "cpu", mesh=mesh)
    reqs = encoded_requests(te, CASES, steps, MAX_SEQ)
    latents = den.denoise(reqs)
    out = {"latents": [x.flatten().tolist() for x in latents],
           "sync_steps": getattr(den.forward_rows, "stats", None) and den.forward_rows.stats.extra.get("sync_steps")}
    if decode:
        vae = VaeDecoderStage.from_pretrained(model_dir, "float32", "cpu")
        out["images"] = [vae.decode(lat, c[3], c[4])[0].tolist() for lat, c in zip(latents, CASES, strict=True)]
    return out


def _worker(rank: int, world_size: int, model_dir: str, out_dir: str, steps: int, warmup: int) -> dict:
    import os

    from omni_runtime.parallel.mesh import Mesh

    store = Path(out_dir) / f"store-pf-{os.environ['MASTER_PORT']}"
    spec = ParallelSpec(pp=world_size, pp_mode="pipefusion", pipefusion_warmup=warmup)
    mesh = Mesh.build(spec, rank, f"file://{store}", "cpu")
    try:
        return run_cases(model_dir, steps, mesh, decode=rank == 0)
    finally:
        mesh.destroy()


@pytest.mark.distributed
@pytest.mark.slow
def test_pipefusion_psnr_against_the_exact_run(tiny_dir: Path, tmp_path: Path) -> None:
    ref = run_cases(str(tiny_dir), 8)
    results = run_workers(_worker, 2, args=(str(tiny_dir), str(tmp_path), 8, 1), timeout=300)
    assert results[1]["latents"] == results[0]["latents"], "the pp ranks end with different latents"
    # 2 shape groups x 8 steps, the first of each synchronous
    assert results[0]["sync_steps"] == 2
    for i, case in enumerate(CASES):
        got, want = np.array(results[0]["images"][i], np.uint8), np.array(ref["images"][i], np.uint8)
        assert got.shape == want.shape == (case[3], case[4], 3)
        value = psnr(got, want)
        assert value >= 30.0, f"case {case}: PSNR {value:.2f} dB < 30 dB"
        lat_got, lat_want = torch.tensor(results[0]["latents"][i]), torch.tensor(ref["latents"][i])
        assert (lat_got - lat_want).abs().max() > 1e-4, "stale K/V was never used: identical to the exact run"


@pytest.mark.distributed
@pytest.mark.slow
def test_pipefusion_with_every_step_warm_is_exact(tiny_dir: Path, tmp_path: Path) -> None:
    ref = run_cases(str(tiny_dir), 3, decode=False)
    results = run_workers(_worker, 2, args=(str(tiny_dir), str(tmp_path), 3, 3), timeout=300)
    for i, case in enumerate(CASES):
        got, want = torch.tensor(results[0]["latents"][i]), torch.tensor(ref["latents"][i])
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel <= 1e-5, f"case {case}: relative error {rel:.3g}"


def test_patches_are_whole_token_rows() -> None:
    from omni_runtime.stages.latents import latent_image_ids

    ids = latent_image_ids(272, 208, 8, torch.device("cpu"), torch.float32)  # 17 rows x 13 tokens
    assert len(token_rows(ids)) == 17
    assert patch_ranges(ids, 2) == [(0, 9 * 13), (9 * 13, 17 * 13)]
    assert patch_ranges(ids, 4) == [(0, 65), (65, 117), (117, 169), (169, 221)]
    with pytest.raises(ValueError, match="pipefusion_patches = 18 > the image's 17 token rows"):
        patch_ranges(ids, 18)


def test_request_with_fewer_token_rows_than_patches_is_a_request_error(tiny_dir: Path) -> None:
    from stage_refs import flux_request

    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.stages import DenoiserStage
    from omni_runtime.stages.errors import RequestError

    den = DenoiserStage.from_pretrained(str(tiny_dir), "float32", "cpu")
    den.mesh = Mesh(ParallelSpec(pp=2, pp_mode="pipefusion", pipefusion_patches=4), 0, torch.device("cpu"),
                    Mesh.single()._groups)
    req = flux_request(prompt_embeds=torch.zeros(4, 32), pooled_prompt_embeds=torch.zeros(32), height=48, width=64)
    with pytest.raises(RequestError, match=r"height=48: 48 / 16 = 3 token row\(s\) < "
                                           r"stages.denoiser.parallel.pipefusion_patches = 4 .*allowed: height >= 64"):
        den.validate(req)
