"""Benchmark the parallel stages. Section ``vae``: VAE patch parallelism against the single-rank decode.

For each image size it runs, in fresh processes and with the phases alternated per repeat:

- ``patch1``: diffusers' ``AutoencoderKL.decode`` on one rank with ``--cores`` threads (the baseline, and the
  exact reference its output is saved as);
- ``patch2``: our patch-parallel decode over ``--patch`` gloo ranks, ``cores / patch`` threads each;
- ``tiled``: diffusers' tiled decode (``enable_tiling``) on one rank with ``--cores`` threads (approximate).

Reported per phase: decode latency (slowest rank), peak activation memory per rank (on CPU the peak RSS during the
decode minus the RSS before it, from ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; on CUDA
``max_memory_allocated`` minus the allocation before), max |delta| against ``patch1``, and for patch mode the
halo bytes each conv sends, the GroupNorm all-reduces per decode and their bytes, against the activation sizes.

The VAE is diffusers' ``AutoencoderKL`` with the FLUX layout (16 latent channels, 8x upsampling) at the widths of
``--preset`` (``tiny``: the test model's, ``small``, ``flux``: the real FLUX.1 widths, for a GPU), randomly
initialised from a fixed seed (no download).

    python tools/bench_parallel.py vae --sizes 1024 2048 --repeats 1 --preset tiny
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
import torch.multiprocessing as mp

logger = logging.getLogger("bench_parallel")

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"block_out_channels": (8, 16, 16, 16), "norm_num_groups": 4, "layers_per_block": 1},
    "small": {"block_out_channels": (16, 32, 32, 32), "norm_num_groups": 8, "layers_per_block": 1},
    "flux": {"block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "layers_per_block": 2},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_vae(preset: str) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    p = PRESETS[preset]
    n = len(p["block_out_channels"])
    torch.manual_seed(0)  # every rank builds the same weights
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, latent_channels=16, act_fn="silu",
                         sample_size=1024, **p).eval()


class _Peak:
    """Peak memory of this process during a block, above what it held when the block started."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> _Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = self._status("VmHWM") - self.base


def _worker(rank: int, world: int, port: int, outdir: str, mode: str, preset: str, height: int, width: int,
            threads: int, device: str) -> None:
    torch.set_num_threads(threads)
    from omni_runtime.parallel.vae_patch_parallel import PatchStats
    from omni_runtime.stages.vae import VaeDecoderStage

    dev = torch.device(device if device == "cpu" else f"cuda:{rank}")
    group = mesh = None
    if world > 1:  # the VAE stage's mesh, as a stage process builds it (backend from the device)
        from omni_runtime.parallel.mesh import Mesh
        from omni_runtime.parallel.parallel_spec import ParallelSpec

        mesh = Mesh.build(ParallelSpec(vae_patch=world), rank, f"tcp://127.0.0.1:{port}", dev)
        group = mesh.group("vae_patch")
    vae = make_vae(preset).to(dev)
    stats = PatchStats()
    stage = VaeDecoderStage(vae, torch.float32, dev, group=group, tiling=mode == "tiled", stats=stats)
    z = torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():  # warm-up on a small latent: thread pools, kernels, gloo buffers
        stage.decode_latents(torch.randn(1, 16, 4 * world, 16, device=dev))
    stats.reset()
    if group is not None:
        group.barrier()
    with torch.no_grad(), _Peak(dev) as peak:
        t0 = time.perf_counter()
        out = stage.decode_latents(z)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
    res: dict[str, Any] = {"latency_s": dt, "peak_bytes": peak.peak, "threads": threads,
                           "halo_convs": stats.halo_exchanges, "halo_bytes": stats.per_conv_halo_bytes,
                           "conv_input_bytes": stats.per_conv_input_bytes, "norm_all_reduces": stats.norm_all_reduces,
                           "norm_all_reduce_bytes": stats.norm_all_reduce_bytes, "gather_bytes": stats.gather_bytes}
    if out is not None:
        ref_path = Path(outdir).parent / f"ref-{height}x{width}.npy"
        arr = out.float().cpu().numpy()
        res["output_bytes"] = arr.nbytes
        if mode == "patch1":
            np.save(ref_path, arr)
        elif ref_path.exists():
            ref = np.load(ref_path)
            res["max_abs_delta"] = float(np.abs(arr - ref).max())
            res["max_rel_delta"] = float(np.abs(arr - ref).max() / np.abs(ref).max())
    (Path(outdir) / f"rank{rank}.json").write_bytes(msgspec.json.encode(res))
    if mesh is not None:
        group.barrier()
        mesh.destroy()  # its groups and the torch.distributed world it initialized


def run_phase(base: str, mode: str, world: int, threads: int, **kw: Any) -> list[dict]:
    outdir = tempfile.mkdtemp(dir=base)
    args = (world, _free_port(), outdir, mode, kw["preset"], kw["height"], kw["width"], threads, kw["device"])
    mp.start_processes(_worker, args=args, nprocs=world, start_method="spawn", join=True)
    return [msgspec.json.decode((Path(outdir) / f"rank{r}.json").read_bytes()) for r in range(world)]


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def vae_section(args: argparse.Namespace) -> list[str]:
    cores = args.cores
    phases = [("patch1", 1, cores), (f"patch{args.patch}", args.patch, max(1, cores // args.patch)),
              ("tiled", 1, cores)]
    lines = [f"VAE decode, preset {args.preset}, fp32 on {args.device}, {cores} core(s); "
             f"{args.repeats} repeat(s), phases alternated; latency = slowest rank, memory = peak per rank"]
    with tempfile.TemporaryDirectory(prefix="bench-vae-") as base:
        for size in args.sizes:
            results: dict[str, list[list[dict]]] = {name: [] for name, _, _ in phases}
            for rep in range(args.repeats):
                order = phases if rep % 2 == 0 else [phases[0]] + phases[:0:-1]  # patch1 first: it is the reference
                for name, world, threads in order:
                    mode = "patch" if name.startswith("patch") and world > 1 else name
                    results[name].append(run_phase(base, mode, world, threads, preset=args.preset, height=size,
                                                   width=size, device=args.device))
            lines.append(f"\n{size}x{size} (latent {size // 8}x{size // 8}):")
            lines.append(f"{'phase':<10}{'ranks x threads':>16}{'latency s':>11}{'vs patch1':>10}"
                         f"{'peak MiB/rank':>15}{'vs patch1':>10}{'max|d| vs exact':>17}{'rel':>10}")
            base_lat = base_mem = None
            for name, world, threads in phases:
                runs = results[name]
                lat = statistics.median(max(r["latency_s"] for r in run) for run in runs)
                mem = statistics.median(max(r["peak_bytes"] for r in run) for run in runs)
                if base_lat is None:
                    base_lat, base_mem = lat, mem
                d = runs[-1][0].get("max_abs_delta")
                rel = runs[-1][0].get("max_rel_delta")
                lines.append(f"{name:<10}{f'{world} x {threads}':>16}{lat:>11.2f}{lat / base_lat:>9.2f}x"
                             f"{_mib(mem):>15}{mem / base_mem:>9.2f}x"
                             f"{('-' if d is None else f'{d:.2e}'):>17}{('-' if rel is None else f'{rel:.1e}'):>10}")
            p = results[f"patch{args.patch}"][-1]
            r0 = p[0]
            if r0["halo_convs"]:
                halo = r0["halo_bytes"]
                inp = r0["conv_input_bytes"]
                lines.append(f"  patch: {r0['halo_convs']} halo convs/decode on rank 0; halo bytes sent per conv "
                             f"{min(halo):,}-{max(halo):,} (total {sum(halo):,} = {sum(halo) / sum(inp):.2%} of "
                             f"the conv inputs' {sum(inp):,} bytes); {r0['norm_all_reduces']} GroupNorm "
                             f"all-reduces/decode, {r0['norm_all_reduce_bytes']:,} bytes; output gather "
                             f"{max(r['gather_bytes'] for r in p):,} bytes/follower; decoded image "
                             f"{r0.get('output_bytes', 0):,} bytes")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="section", required=True)
    v = sub.add_parser("vae", help="VAE patch parallelism vs the single-rank and the tiled decode")
    v.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="square image sides (pixels)")
    v.add_argument("--patch", type=int, default=2)
    v.add_argument("--repeats", type=int, default=1)
    v.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    v.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    v.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("\n".join(vae_section(args)))


if __name__ == "__main__":
    main()
