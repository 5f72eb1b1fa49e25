"""VAE patch parallelism for Wan's causal 3D VAE (``AutoencoderKLWan``): the distributed decode equals diffusers'
``AutoencoderKLWan.decode`` of the same latents and weights.

Real processes on gloo through tests/spawn.py. Reference: ``AutoencoderKLWan.decode`` on rank 0 of the same process,
in float64 (tolerance 1e-9 x max |reference|: the same numbers) and in float32 (the served dtype: 1e-4 x max
|reference|, float32 rounding through ~30 convolutions of random weights; one uint8 level is 8e-3 of the range). The VAE
is made in code, deeper than the tiny preset: channel changes (1x1x1 shortcuts), two 3D upsamplers (temporal
``time_conv`` and its ``Rep`` first chunk), one 2D upsampler, the mid block's attention, 3 latent frames (the
feature cache carried across chunks), uneven row bands (5 latent rows over 2 ranks); and a video with fewer latent
rows than ranks, which rank 0 decodes alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from spawn import run_workers  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


def _vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    with torch.no_grad():  # random, not diffusers' near-zero init: every part of the decoder moves the output
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return vae


def _stage(rank: int, world: int, vae, stats=None):
    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec
    from omni_runtime.stages.models.wan.family import AutoencoderKLWanKind
    from omni_runtime.stages.vae import VaeDecoderStage

    group = Mesh.build(ParallelSpec(vae_patch=world), rank, None, "cpu").group("vae_patch")
    return VaeDecoderStage(vae, vae.dtype, torch.device("cpu"), group=group, kind=AutoencoderKLWanKind(),
                           stats=stats)


def _exact_worker(rank: int, world: int, shape: list[int]) -> list:
    from omni_runtime.parallel.vae_patch_parallel import PatchStats

    out = []
    for dtype in (torch.float64, torch.float32):
        vae = _vae().to(dtype)
        stats = PatchStats()
        stage = _stage(rank, world, vae, stats)
        z = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        with torch.no_grad():
            got = stage.decode_latents(z)
            if rank != 0:
                out.append({"none": got is None, "halo": stats.halo_exchanges})
                continue
            ref = vae.decode(z, return_dict=False)[0]
        out.append({"shape": list(got.shape), "ref_shape": list(ref.shape), "halo": stats.halo_exchanges,
                    "rel": float((got - ref).abs().max() / ref.abs().max()), "spread": float(ref.std())})
    # fewer latent rows (dim -2, not the frames of dim 2) than ranks: rank 0 decodes alone, the single-rank numbers
    stats.reset()
    z = torch.randn(1, 4, world + 1, 1, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = stage.decode_latents(z)
        ref = vae.decode(z, return_dict=False)[0] if rank == 0 else None
    out.append({"none": got is None, "halo": stats.halo_exchanges,
                "equal": None if ref is None else bool(torch.equal(got, ref))})
    return out


@pytest.mark.parametrize("world", [2])
def test_patch_decode_equals_diffusers(world):
    shape = [2, 4, 3, 5, 6]  # batch 2, 3 latent frames, 5 x 6 latent pixels
    results = run_workers(_exact_worker, world, args=(shape,), init_process_group=True, timeout=100)
    f64, f32, few_rows = results[0]
    assert few_rows == {"none": False, "halo": 0, "equal": True}, few_rows
    assert all(r[-1] == {"none": True, "halo": 0, "equal": None} for r in results[1:]), results
    for res, tol in ((f64, 1e-9), (f32, 1e-4)):
        assert res["shape"] == res["ref_shape"] == [2, 3, 9, 40, 48], res
        assert res["spread"] > 0.05, res  # the output is not constant: a wrong halo or cache would show
        assert res["rel"] <= tol, (world, res)
        assert res["halo"] > 0  # the split really ran
    for rank_results in results[1:]:
        assert all(r["none"] and r["halo"] > 0 for r in rank_results[:2]), rank_results
