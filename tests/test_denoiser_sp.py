"""DenoiserStage under sequence parallelism (Ulysses 2, Ring 2, Ulysses 2 x Ring 2 on gloo) equals the
single-process run: every rank ends with the same latents, and the image decoded on rank 0 is within 2/255.

208x144 gives 13 x 9 = 117 image tokens, which neither 2 nor 4 divides. A forward pre-hook on the first
transformer block records how many image tokens a rank really processes, so the test fails if the hooks
silently did not shard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from spawn import run_workers  # noqa: E402

# (prompt, negative prompt or None, seed, height, width, true_cfg_scale)
CASES = [
    ("a photo of a cat", None, 1, 208, 144, 1.0),
    ("the dog on the sofa", None, 2, 208, 144, 1.0),
    ("a red cube", "blurry", 3, 208, 144, 2.5),
    ("a lighthouse", None, 4, 128, 128, 1.0),
]
STEPS = 2
MAX_SEQ = 16


def _run_cases(model_dir: str, out_dir: str | None, tag: str, mesh=None) -> dict:
    """Encode, denoise (all CASES in one call: shape groups batch) and, on rank 0, decode."""
    from stage_refs import encoded_requests

    from omni_runtime.stages import DenoiserStage, TextEncoderStage, VaeDecoderStage

    te = TextEncoderStage.from_pretrained(model_dir, "float32", "cpu")
    den = DenoiserStage.from_pretrained(model_dir, "float32", "cpu", mesh=mesh)
    seen: list[int] = []
    den.model.transformer_blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    reqs = encoded_requests(te, CASES, STEPS, MAX_SEQ)
    latents = den.denoise(reqs)
    result = {"sp": den.mesh.size("sp"), "tokens_seen": sorted(set(seen)),
              "latents": [x.flatten().tolist() for x in latents]}
    if out_dir is not None:
        vae = VaeDecoderStage.from_pretrained(model_dir, "float32", "cpu")
        for i, (lat, case) in enumerate(zip(latents, CASES, strict=True)):
            img = vae.decode(lat, case[3], case[4])[0]
            np.save(Path(out_dir) / f"{tag}_{i}.npy", img, allow_pickle=False)
    return result


def _sp_worker(rank: int, world_size: int, model_dir: str, out_dir: str, ulysses: int, ring: int) -> dict:
    import os

    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec

    # a file:// rendezvous (what the launcher uses on one node: no TCP store listens)
    store = Path(out_dir) / f"store-{ulysses}x{ring}-{os.environ['MASTER_PORT']}"
    mesh = Mesh.build(ParallelSpec(ulysses=ulysses, ring=ring), rank, f"file://{store}", "cpu")
    try:
        return _run_cases(model_dir, out_dir if rank == 0 else None, f"sp{ulysses}x{ring}", mesh)
    finally:
        mesh.destroy()


@pytest.fixture(scope="module")
def single(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("images")
    return _run_cases(str(tiny_dir), str(out), "single"), out


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("ulysses", "ring"), [(2, 1), (1, 2), (2, 2)], ids=["ulysses2", "ring2", "ulysses2xring2"])
def test_denoiser_sp_equals_single_process(tiny_dir: Path, single: tuple[dict, Path], ulysses: int,
                                           ring: int) -> None:
    ref, out = single
    world = ulysses * ring
    results = run_workers(_sp_worker, world, args=(str(tiny_dir), str(out), ulysses, ring), timeout=240)
    for rank, res in enumerate(results):
        assert res["sp"] == world
        # 117 tokens over `world` ranks: each rank's blocks see at most ceil(117 / world) (+ padding) tokens.
        assert max(res["tokens_seen"]) <= -(-117 // world) + world - 1, (rank, res["tokens_seen"])
        assert max(res["tokens_seen"]) < 64, f"rank {rank} processed unsharded image tokens: {res['tokens_seen']}"
        assert res["latents"] == results[0]["latents"], f"rank {rank} latents differ from rank 0"
    for i, case in enumerate(CASES):
        got = torch.tensor(results[0]["latents"][i])
        want = torch.tensor(ref["latents"][i])
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel <= 1e-3, f"case {case}: latent relative error {rel:.3g}"
        a = np.load(out / f"sp{ulysses}x{ring}_{i}.npy", allow_pickle=False).astype(np.int16)
        b = np.load(out / f"single_{i}.npy", allow_pickle=False).astype(np.int16)
        assert a.shape == b.shape == (case[3], case[4], 3)
        diff = np.abs(a - b).max()
        assert diff <= 2, f"case {case}: image max |delta| {diff} > 2/255"
