"""VAE patch parallelism: the distributed decode equals diffusers' single-rank decode of the same latents.

Real processes on gloo through tests/spawn.py. Reference: ``AutoencoderKL.decode`` on rank 0 of the same
process (fp32); tolerance: max |delta| <= 1e-5 x max |reference|.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from spawn import run_workers  # noqa: E402
from stage_refs import single_rank_config  # noqa: E402

from omni_runtime.parallel.vae_patch_parallel import VaePatchError, vae_row_ranges  # noqa: E402

REL_TOL = 1e-5

# (batch, image height, image width); the tiny VAE downsamples by 8
CASES = [(1, 256, 256), (1, 272, 208), (3, 272, 208), (1, 16, 1024)]


def _mesh(rank: int, world: int):
    """The mesh of a VAE stage with ``patch = world`` (what a stage process builds), on the spawned gloo world."""
    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec

    return Mesh.build(ParallelSpec(vae_patch=world), rank, None, "cpu")


def _group(rank: int, world: int):
    return _mesh(rank, world).group("vae_patch")


def _decode_worker(rank: int, world: int, model_dir: str, cases: list) -> list:
    from omni_runtime.parallel.vae_patch_parallel import PatchStats
    from omni_runtime.stages.vae import VaeDecoderStage

    stats = PatchStats()
    mesh = _mesh(rank, world)
    stage = VaeDecoderStage.from_pretrained(model_dir, mesh=mesh, stats=stats)
    out = []
    for batch, height, width in cases:
        gen = torch.Generator().manual_seed(height * 7 + width + batch)
        z = torch.randn(batch, 16, height // 8, width // 8, generator=gen)
        stats.reset()
        mesh.reset_comm_stats()
        got = stage.decode_latents(z)
        # what went through the patch group's communicator (halo sends, norm all-reduces, Ring K/V, the gather)
        comm = {"calls": dict(mesh.comm_stats().calls)}
        if rank != 0:
            out.append({"none": got is None, "halo": stats.halo_exchanges, **comm})
            continue
        ref = stage.vae.decode(z, return_dict=False)[0]
        out.append({"shape": list(got.shape), "ref_shape": list(ref.shape), "halo": stats.halo_exchanges,
                    "rel": float((got - ref).abs().max() / ref.abs().max()), **comm})
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3, 4])
def test_patch_decode_equals_single_rank(tiny_dir, world):
    results = run_workers(_decode_worker, world, args=(str(tiny_dir), CASES), init_process_group=True, timeout=300)
    for (batch, height, width), res in zip(CASES, results[0], strict=True):
        assert res["shape"] == res["ref_shape"] == [batch, 3, height, width]
        assert res["rel"] <= REL_TOL, (world, height, width, res)
        split = height // 8 >= world
        # the exact split really ran (halo exchanges) unless the image has fewer latent rows than ranks
        assert (res["halo"] > 0) == split, (world, height, res)
    for rank, rank_results in enumerate(results):
        assert rank == 0 or all(r["none"] for r in rank_results)
        for (_, height, _), res in zip(CASES, rank_results, strict=True):
            calls = res["calls"]
            if height // 8 < world:  # the fallback: the ranks only met at the barrier (cpu group, no tensor)
                assert calls == {}, (rank, calls)
                continue
            # every exchange went through the communicator of mesh.group("vae_patch")
            assert calls["send"] > 0 and calls["all_reduce"] > 0 and calls["p2p_send"] > 0, (rank, calls)
            assert ("gather" in calls) == (rank != 0), (rank, calls)


def _wider_vae_worker(rank: int, world: int, rows: int, cols: int) -> float:
    """A VAE unlike the tiny one: 2 layers per block (3 resnets per up block), 8 groups, channel changes that
    need the 1x1 shortcut, 4 latent channels, 4x upsampling; the same random weights on every rank."""
    from diffusers import AutoencoderKL

    from omni_runtime.stages.vae import VaeDecoderStage

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 24, 32),
                        layers_per_block=2, latent_channels=4, norm_num_groups=8, sample_size=64).eval()
    stage = VaeDecoderStage(vae, torch.float32, torch.device("cpu"), group=_group(rank, world))
    z = torch.randn(2, 4, rows, cols, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = stage.decode_latents(z)
        if rank != 0:
            return 0.0
        ref = vae.decode(z, return_dict=False)[0]
    assert got.shape == ref.shape == (2, 3, rows * 4, cols * 4)
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.distributed
def test_patch_decode_of_a_deeper_vae_with_uneven_rows():
    rels = run_workers(_wider_vae_worker, 3, args=(41, 12), init_process_group=True, timeout=300)  # 14, 14, 13
    assert rels[0] <= REL_TOL, rels


def _norm_worker(rank: int, world: int, rows: int) -> float:
    from omni_runtime.parallel.vae_patch_parallel import PatchGroup

    torch.manual_seed(0)
    full = torch.randn(2, 12, rows, 5) * 3 + 50  # large mean: the statistics must not cancel
    norm = torch.nn.GroupNorm(3, 12, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12))
        norm.bias.copy_(torch.randn(12))
        ref = norm(full)
        s, e = vae_row_ranges(rows, world)[rank]
        pg = PatchGroup(_group(rank, world))
        got = pg.group_norm(full[:, :, s:e], norm, rows)
    assert pg.stats.norm_all_reduces == 2
    return float((got - ref[:, :, s:e]).abs().max())


@pytest.mark.distributed
def test_group_norm_exact_with_uneven_rows():
    rows = 7  # 3 ranks: 3, 2, 2 rows
    assert [e - s for s, e in vae_row_ranges(rows, 3)] == [3, 2, 2]
    deltas = run_workers(_norm_worker, 3, args=(rows,), init_process_group=True, timeout=120)
    assert max(deltas) <= 1e-5, deltas


def test_row_ranges():
    assert vae_row_ranges(34, 4) == [(0, 9), (9, 18), (18, 26), (26, 34)]
    assert vae_row_ranges(32, 2) == [(0, 16), (16, 32)]
    assert vae_row_ranges(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert vae_row_ranges(5, 1) == [(0, 5)]
    for rows, patch in ((0, 2), (4, 0), (-1, 1)):
        with pytest.raises(VaePatchError, match="must be >= 1"):
            vae_row_ranges(rows, patch)


def _too_few_rows_worker(rank: int, world: int, model_dir: str) -> str:
    from omni_runtime.stages.vae import VaeDecoderStage
    from omni_runtime.stages.vae_patch_decode import patch_decode

    stage = VaeDecoderStage.from_pretrained(model_dir, mesh=_mesh(rank, world))
    try:
        patch_decode(stage.vae, torch.zeros(1, 16, 2, 4), stage.patch)
    except VaePatchError as e:
        return str(e)
    return ""


@pytest.mark.distributed
def test_patch_decode_refuses_fewer_rows_than_ranks(tiny_dir):
    """The mechanism itself refuses (the stage falls back before calling it, tested above)."""
    msgs = run_workers(_too_few_rows_worker, 3, args=(str(tiny_dir),), init_process_group=True, timeout=120)
    assert all("2 latent rows cannot be split over 3 patch ranks" in m for m in msgs), msgs


# --------------------------------------------------------------------------- through serve

def _b64_image(r) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_serve_patch2_matches_patch1_and_recovers_from_a_follower_kill(tmp_path):
    import httpx
    from test_server_harness import Server

    from omni_runtime.runtime import Omni

    server = Server(tmp_path, base_config="patch2.toml")
    try:
        titles = sorted(" ".join(p.cmdline()).strip() for p in server.stage_procs())
        assert "omni-runtime: vae[0] rank 1/2" in titles, titles
        body = {"prompt": "a lighthouse", "seed": 5, "size": "208x272", "num_inference_steps": 2}
        r = httpx.post(server.url + "/v1/images/generations", json=body, headers=server.headers, timeout=120)
        assert r.status_code == 200, r.text
        served = _b64_image(r)

        # SIGKILL the VAE follower while it decodes: the in-flight request gets a 503 naming the VAE
        follower = next(p for p in server.stage_procs() if "vae[0] rank 1/2" in " ".join(p.cmdline()))
        result: dict = {}
        big = {"prompt": "big", "seed": 1, "size": "2048x2048", "num_inference_steps": 1}

        def post() -> None:
            result["r"] = httpx.post(server.url + "/v1/images/generations", json=big, headers=server.headers,
                                     timeout=200)

        t = threading.Thread(target=post)
        base = sum(follower.cpu_times()[:2])
        t.start()
        end = time.monotonic() + 150
        while sum(follower.cpu_times()[:2]) - base < 0.3:  # the follower started decoding
            assert time.monotonic() < end and "r" not in result, "the follower never started decoding"
            time.sleep(0.02)
        follower.send_signal(signal.SIGKILL)
        t.join(60)
        r = result["r"]
        assert r.status_code == 503 and "vae[0] rank 1" in r.json()["error"]["message"], r.text
        r = httpx.post(server.url + "/v1/images/generations", json=body, headers=server.headers, timeout=180)
        assert r.status_code == 200, r.text
        assert np.array_equal(_b64_image(r), served)
        assert "vae[0] ready (generation 2)" in server.log_text()
    finally:
        server.stop()
    assert server.shm_entries() == []
    with Omni(single_rank_config(server.config_path), in_process=True) as omni:
        ref = np.asarray(omni.generate("a lighthouse", seed=5, size="208x272", num_inference_steps=2)[0])
    diff = np.abs(served.astype(int) - ref.astype(int))
    assert served.shape == ref.shape == (272, 208, 3) and diff.max() <= 1, diff.max()


# --------------------------------------------------------------------------- check and tiling

ROOT = Path(__file__).resolve().parents[1]


def test_check_prints_each_vae_rank_row_range(capsys):
    from omni_runtime.runtime.cli import main

    assert main(["check", str(ROOT / "configs" / "patch2.toml"), "--size", "1024x272"]) == 0
    out = capsys.readouterr().out
    assert "rank 0: latent rows [0, 17) -> image rows [0, 136)" in out
    assert "rank 1: latent rows [17, 34) -> image rows [136, 272)" in out
    assert main(["check", str(ROOT / "configs" / "patch2.toml"), "--size", "1024x16"]) == 0
    assert "rank 1: latent rows [1, 2) -> image rows [8, 16)" in capsys.readouterr().out  # 2 rows: 1 + 1


def test_vae_row_lines_fallback_and_uneven():
    from omni_runtime.runtime.layout import vae_row_lines

    assert vae_row_lines(3, 1024, 16) == ["  vae rows for 1024x16: 2 latent rows < 3 patch ranks, rank 0 decodes alone"]
    lines = vae_row_lines(4, 208, 272)
    assert lines[-1] == "    rank 3: latent rows [26, 34) -> image rows [208, 272)"


@pytest.mark.parametrize("size", ["10x10", "abc", "4096x16"])
def test_check_rejects_a_bad_size(capsys, size):
    from omni_runtime.runtime.cli import main

    assert main(["check", str(ROOT / "configs" / "patch2.toml"), "--size", size]) == 2
    assert f"--size='{size}'" in capsys.readouterr().err


def test_tiling_is_diffusers_tiled_decode_and_approximate(tiny_dir):
    from omni_runtime.stages.vae import VaeDecoderStage

    exact = VaeDecoderStage.from_pretrained(tiny_dir)
    tiled = VaeDecoderStage.from_pretrained(tiny_dir, tiling=True)
    assert tiled.vae.use_tiling and not exact.vae.use_tiling
    z = torch.randn(1, 16, 64, 48, generator=torch.Generator().manual_seed(3))  # 512x384: more than one tile
    with torch.no_grad():
        got = tiled.decode_latents(z)
        assert torch.equal(got, tiled.vae.tiled_decode(z, return_dict=False)[0])
        ref = exact.decode_latents(z)
    delta = float((got - ref).abs().max())
    assert got.shape == ref.shape and 0 < delta < 1.0, delta


def test_tiling_with_patch_is_refused():
    from omni_runtime.stages.vae import VaeDecoderStage

    class Two:
        world_size = 2

    with pytest.raises(ValueError, match="cannot be combined"):
        VaeDecoderStage(torch.nn.Module(), torch.float32, torch.device("cpu"), group=Two(), tiling=True)


@pytest.mark.parametrize("extra, patch, tiling", [("", 2, False),
                                                  ("[stages.vae]\ntiling = true\n", 1, True)])
def test_launcher_gives_the_vae_ranks_their_patch_mesh_and_tiling(tmp_path, monkeypatch, extra, patch, tiling):
    """What the VAE rank processes get from the launcher: the ParallelSpec their Mesh is built from (vae_patch),
    one rendezvous per replica, threads split like the denoiser's ranks, and [stages.vae] tiling."""
    import msgspec

    from omni_runtime.comm import instance as rt_instance
    from omni_runtime.parallel.parallel_spec import ParallelSpec
    from omni_runtime.runtime.config_load import load_config
    from omni_runtime.runtime.cores import cpus, stage_threads
    from omni_runtime.runtime.launcher import LocalLauncher

    monkeypatch.setenv(rt_instance.INSTANCE_ENV, f"vae{patch}p{os.getpid()}")
    text = (ROOT / "configs" / "patch2.toml").read_text().replace("patch = 2", f"patch = {patch}")
    path = tmp_path / "c.toml"
    path.write_text(text.replace("[stages.vae]\n", extra or "[stages.vae]\n"))  # the model is not loaded here
    cfg = load_config(path)
    launcher = LocalLauncher(cfg)  # starts nothing
    try:
        specs = launcher.replicas["vae"][0].specs()
        assert len(specs) == patch and [s.rank for s in specs] == list(range(patch))
        assert all(msgspec.convert(s.parallel, ParallelSpec) == ParallelSpec(vae_patch=patch) for s in specs)
        assert len({s.rendezvous for s in specs}) == 1
        assert all(s.vae_tiling is tiling and s.threads == stage_threads(patch, cpus(), 0) for s in specs)
        assert not any(s.vae_tiling for s in launcher.replicas["denoiser"][0].specs())
    finally:
        launcher.shutdown()
