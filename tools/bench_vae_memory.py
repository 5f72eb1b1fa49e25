"""Per-rank peak memory of one VAE decode, patch 1 (the default layout) against patch 2 / 4 (issues 24 and 29).

Each case runs its ranks as separate processes (gloo over localhost, like the VAE stage's ranks): every rank builds
the VAE (the same random weights; the real architecture, its channel widths divided by ``--width-div``), makes the
same latents and prints READY; then this process resets each rank's peak RSS (``5 > /proc/<pid>/clear_refs``:
VmHWM back to the current VmRSS), lets all ranks decode once through ``stages.vae.VaeDecoderStage.decode_latents``
(what the stage runs: diffusers' own ``decode`` at patch 1, the patch-parallel walk above it) and reads VmHWM from
``/proc/<pid>/status`` when they are done. Reported per rank: the peak during the decode and the growth over the
rank's RSS before it (weights and interpreter excluded). Ratios compare the largest rank's growth with patch 1's;
the cases alternate (patch 1, patch 2, ..., patch 1, patch 2, ...) and the median of ``--repeats`` is reported.

Cases: ``wan`` is ``AutoencoderKLWan`` (Wan 2.1's config: base_dim 96, dim_mult 1,2,4,4, 2 res blocks, z_dim 16)
decoding ``--wan-frames`` latent frames of ``--wan-size``; ``flux`` is FLUX.1's ``AutoencoderKL`` (128,256,512,512
channels, 2 layers per block, 16 latent channels) decoding one image of each ``--flux-sizes``.

    python tools/bench_vae_memory.py [--width-div 16] [--repeats 2] [--flux-sizes 1024,1536] [--flux-patches 1,2,4]
        [--wan-size 256x256] [--wan-frames 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- worker (one rank)
def _make_vae(kind: str, div: int):
    import torch

    torch.manual_seed(0)
    if kind == "flux":
        from diffusers import AutoencoderKL

        chans = [c // div for c in (128, 256, 512, 512)]
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=chans, layers_per_block=2,
                             latent_channels=16, norm_num_groups=min(32, chans[0]), use_quant_conv=False,
                             use_post_quant_conv=False).eval()
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=96 // div, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                            temperal_downsample=[False, True, True]).eval()


def _worker(args: argparse.Namespace) -> None:
    import torch

    from omni_runtime.stages.vae import AutoencoderKLKind, VaeDecoderStage

    rank, patch = int(os.environ["RANK"]), args.patch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // patch))
    group = None
    if patch > 1:
        import torch.distributed as dist

        from omni_runtime.parallel.mesh import Mesh
        from omni_runtime.parallel.parallel_spec import ParallelSpec

        dist.init_process_group("gloo", rank=rank, world_size=patch, init_method=f"tcp://127.0.0.1:{args.port}")
        group = Mesh.build(ParallelSpec(vae_patch=patch), rank, None, "cpu").group("vae_patch")
    vae = _make_vae(args.kind, args.width_div)
    if args.kind == "flux":
        kind = AutoencoderKLKind()
        z = torch.randn(1, 16, args.height // 8, args.width // 8, generator=torch.Generator().manual_seed(1))
    else:
        from omni_runtime.stages.models.wan.family import AutoencoderKLWanKind

        kind = AutoencoderKLWanKind()
        z = torch.randn(1, 16, args.frames, args.height // 8, args.width // 8,
                        generator=torch.Generator().manual_seed(1))
    stage = VaeDecoderStage(vae, torch.float32, torch.device("cpu"), group=group, kind=kind)
    print("READY", flush=True)
    assert sys.stdin.readline().strip() == "GO"
    start = time.perf_counter()
    with torch.no_grad():
        out = stage.decode_latents(z)
    seconds = time.perf_counter() - start
    shape = None if out is None else list(out.shape)
    print("DONE " + json.dumps({"seconds": seconds, "shape": shape}), flush=True)
    sys.stdin.readline()  # EXIT: stay alive (and measurable) until the driver has read VmHWM
    if group is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


# --------------------------------------------------------------------------- driver
def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


def _expect(proc: subprocess.Popen, word: str) -> str:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"rank process {proc.pid} exited (code {proc.wait()}) before {word}")
        if line.startswith(word):
            return line[len(word):].strip()


def run_case(kind: str, patch: int, height: int, width: int, frames: int, div: int) -> dict:
    """One decode on ``patch`` rank processes; per-rank MiB before, peak during, and the decode's seconds."""
    from omni_runtime.runtime.launcher import free_port

    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--kind", kind, "--patch", str(patch),
           "--port", str(port), "--height", str(height), "--width", str(width), "--frames", str(frames),
           "--width-div", str(div)]
    procs = [subprocess.Popen(cmd, env={**os.environ, "RANK": str(r)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=ROOT) for r in range(patch)]
    try:
        for p in procs:
            _expect(p, "READY")
        before = [_status_kib(p.pid, "VmRSS") for p in procs]
        for p in procs:  # VmHWM := VmRSS now, so the next peak is the decode's
            Path(f"/proc/{p.pid}/clear_refs").write_text("5")
        for p in procs:
            p.stdin.write("GO\n")
            p.stdin.flush()
        done = [json.loads(_expect(p, "DONE")) for p in procs]
        peak = [_status_kib(p.pid, "VmHWM") for p in procs]
        for p in procs:
            p.stdin.write("EXIT\n")
            p.stdin.flush()
        for p in procs:
            if p.wait(timeout=60) != 0:
                raise RuntimeError(f"rank process {p.pid} exited with {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if done[0]["shape"] is None:
        raise RuntimeError("rank 0 returned no decoded output")
    return {"before_mib": [b / 1024 for b in before], "peak_mib": [h / 1024 for h in peak],
            "growth_mib": [(h - b) / 1024 for h, b in zip(peak, before, strict=True)],
            "seconds": max(d["seconds"] for d in done), "shape": done[0]["shape"]}


def _cases(args: argparse.Namespace) -> list[tuple[str, str, int, int, int, list[int]]]:
    """(label, kind, height, width, frames, patches)."""
    out = []
    if "wan" in args.kinds:
        h, w = (int(v) for v in args.wan_size.split("x"))
        out.append((f"wan {h}x{w}x{args.wan_frames} latent frames", "wan", h, w, args.wan_frames, [1, 2]))
    if "flux" in args.kinds:
        for s in (int(v) for v in args.flux_sizes.split(",")):
            out.append((f"flux {s}x{s}", "flux", s, s, 1, [int(p) for p in args.flux_patches.split(",")]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", choices=("wan", "flux"), help=argparse.SUPPRESS)
    ap.add_argument("--patch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--height", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--width-div", type=int, default=16, help="divide the VAEs' channel widths by this (1: real)")
    ap.add_argument("--kinds", default="wan,flux", help="which VAEs: wan, flux or both")
    ap.add_argument("--flux-sizes", default="1024,1536", help="square image sizes for the Flux VAE")
    ap.add_argument("--flux-patches", default="1,2,4", help="patch degrees for the Flux VAE (1 is the baseline)")
    ap.add_argument("--wan-size", default="256x256", help="HxW of the Wan video")
    ap.add_argument("--wan-frames", type=int, default=3, help="latent frames of the Wan video (x4 - 3 frames)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per case (median reported)")
    ap.add_argument("--json", help="write every run's numbers here")
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    rows, raw = [], []
    for label, kind, h, w, frames, patches in _cases(args):
        runs: dict[int, list[dict]] = {p: [] for p in patches}
        for _ in range(args.repeats):
            for p in patches:  # alternating phases
                res = run_case(kind, p, h, w, frames, args.width_div)
                runs[p].append(res)
                raw.append({"case": label, "patch": p, **res})
                print(f"# {label} patch {p}: growth {[round(g) for g in res['growth_mib']]} MiB, "
                      f"{res['seconds']:.1f} s", file=sys.stderr, flush=True)
        base = statistics.median(max(r["growth_mib"]) for r in runs[1])
        for p in patches:
            growth = statistics.median(max(r["growth_mib"]) for r in runs[p])
            peak = statistics.median(max(r["peak_mib"]) for r in runs[p])
            secs = statistics.median(r["seconds"] for r in runs[p])
            rows.append((label, p, peak, growth, growth / base, secs))
    print("| case | patch | peak RSS, largest rank (MiB) | decode growth, largest rank (MiB) | growth vs patch 1 "
          "| decode s |")
    print("|---|---|---|---|---|---|")
    for label, p, peak, growth, ratio, secs in rows:
        print(f"| {label} | {p} | {peak:.0f} | {growth:.0f} | {ratio:.2f}x | {secs:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
