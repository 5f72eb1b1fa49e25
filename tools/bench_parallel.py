"""Benchmarks of the parallel strategies inside one stage, each against its baseline in the same run.

Section ``vae``: VAE patch parallelism against the single-rank decode. For each image size it runs, in fresh
processes and with the phases alternated per repeat:

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

Section ``hsdp`` (:func:`bench_hsdp`), 2 ranks on gloo, a transformer of >= 200 MB (``make_big_transformer``):

- load: per-rank resident parameter bytes and peak RSS growth while loading (and reading every weight once),
  hsdp_shard 2 (each rank reads its rows) vs 1 (every rank loads the whole model); each in fresh processes;
- step latency: one transformer forward (one denoising step), hsdp_shard 2 vs unsharded, in the same processes
  with the same threads, phases alternated, median of per-pair ratios; plus hsdp_shard 2 with forward prefetch
  (each block starts the next block's all-gather) to see whether gloo overlaps it with compute;
- bytes all-gathered per step (counted at ``torch.distributed.all_gather_single``, FSDP2's collective) against the
  model size.

Section ``cfg`` (:func:`bench_cfg`): CFG parallel on the ``--preset`` Flux model (``small`` by default), in fresh
processes per phase, the phases alternated per round:

- ``cfg1``: one rank with ``--cores`` threads (the baseline); ``cfg2``: 2 gloo ranks (cfg 2), ``cores / 2`` threads
  each. Workloads: true-CFG requests (negative prompt, batch 1 and 2) and requests without a negative branch
  (batch 2: data parallel over the cfg ranks; batch 1: one cfg rank has no row and waits in the gather).
- per workload: denoise latency (median of the rounds) and the median of the per-round ratios cfg2 / cfg1;
- bytes each rank sends per step (counted by the communicators' ``CommStats``) against the minimum: the predictions
  of the rows the rank computed, to the cfg - 1 peers.

Section ``pp`` (``tools/bench_pp.py``): layer pipeline parallelism (2 ranks x 1 thread) against one rank with 2
threads, throughput at each batch and the measured bubble against the GPipe bound; PipeFusion against layer PP
(latency, PSNR); bytes sent per step per rank against the minimum.

    python tools/bench_parallel.py vae --sizes 1024 2048 --repeats 1 --preset tiny
    python tools/bench_parallel.py hsdp [--tokens 256] [--pairs 3] [--threads 1]
    python tools/bench_parallel.py cfg [--size 256] [--steps 4] [--rounds 3] [--cores 2] [--preset small]
    python tools/bench_parallel.py pp [--batches 4 8] [--size 256] [--steps 4] [--repeats 1]
    python tools/bench_parallel.py pp-accuracy [--steps 4 8 16] [--size 128] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
import torch.multiprocessing as mp
from phase_rounds import phase_rounds, rank_rounds  # tools/ is this script's directory

from omni_runtime.runtime.launcher import free_port

logger = logging.getLogger("bench_parallel")


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"block_out_channels": (8, 16, 16, 16), "norm_num_groups": 4, "layers_per_block": 1},
    "small": {"block_out_channels": (16, 32, 32, 32), "norm_num_groups": 8, "layers_per_block": 1},
    "flux": {"block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "layers_per_block": 2},
}


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
    args = (world, free_port(), outdir, mode, kw["preset"], kw["height"], kw["width"], threads, kw["device"])
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


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _touch(model: Any) -> None:
    """Read every local parameter byte (the unsharded loader's tensors are views of the mmapped file)."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        (p.to_local() if isinstance(p, DTensor) else p).sum()


def _flux_inputs(cfg: Any, tokens: int, text: int = 16) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    side = int(tokens ** 0.5)
    ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // side, torch.arange(tokens) % side], 1)
    return dict(hidden_states=torch.randn(1, tokens, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), img_ids=ids.float(), txt_ids=torch.zeros(text, 3),
                guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None)


def _hsdp_rank(rank: int, world: int, port: int, path: str, out: str, phase: str, tokens: int, pairs: int,
               threads: int) -> None:
    import torch
    import torch.distributed as dist

    from omni_runtime.parallel.hsdp import HSDPInferenceConfig, apply_hsdp_to_model, local_parameter_bytes
    from omni_runtime.stages.models.flux.transformer import FluxTransformer

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = HSDPInferenceConfig(hsdp_shard_size=world)
    apply_hsdp_to_model(torch.nn.Linear(4, 4, device="meta"), cfg)  # one-off imports + mesh: process baseline
    result: dict[str, Any] = {}
    if phase in ("load1", "load2"):
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
        before = _status_bytes("VmRSS")
        t0 = time.perf_counter()
        model = FluxTransformer.from_pretrained(path, hsdp=cfg if phase == "load2" else None)
        _touch(model)
        result = {"load_s": time.perf_counter() - t0, "peak_growth": _status_bytes("VmHWM") - before,
                  "local_bytes": local_parameter_bytes(model)}
    else:
        full = FluxTransformer.from_pretrained(path)
        _touch(full)
        sharded = FluxTransformer.from_pretrained(path, hsdp=cfg)
        units = [*sharded.transformer_blocks, *sharded.single_transformer_blocks]
        inputs = _flux_inputs(full.config, tokens)

        def set_prefetch(on: bool) -> None:
            for i, unit in enumerate(units[:-1]):
                unit.set_modules_to_forward_prefetch([units[i + 1]] if on else [])

        gathered = [0]
        original = dist.all_gather_single

        def counting(output, input, *args, **kwargs):  # noqa: A002 (the collective's own parameter name)
            gathered[0] += output.numel() * output.element_size()
            return original(output, input, *args, **kwargs)

        def step(model: Any) -> float:
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                model(**inputs)
            return time.perf_counter() - t0

        step(full), step(sharded)  # warm-up
        dist.all_gather_single = counting
        step(sharded)
        dist.all_gather_single = original
        times: dict[str, list[float]] = {"unsharded": [], "hsdp2": [], "hsdp2_prefetch": []}
        for i in range(pairs):  # alternate the phases; rotate which goes first
            order = ["unsharded", "hsdp2", "hsdp2_prefetch"]
            order = order[i % 3:] + order[:i % 3]
            for name in order:
                set_prefetch(name == "hsdp2_prefetch")
                times[name].append(step(full if name == "unsharded" else sharded))
        result = {"times": times, "gathered_per_step": gathered[0],
                  "model_bytes": sum(p.numel() * p.element_size() for p in full.parameters())}
    Path(out, f"{phase}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run(phase: str, world: int, path: str, out: str, tokens: int, pairs: int, threads: int,
         timeout: float = 600) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_hsdp_rank, args=(r, world, port, path, out, phase, tokens, pairs, threads))
             for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"phase {phase} failed: exit codes {[p.exitcode for p in procs]}")
    return [json.loads(Path(out, f"{phase}-rank{r}.json").read_text()) for r in range(world)]


def bench_hsdp(tokens: int = 256, pairs: int = 3, threads: int = 1, layers: int = 2, single_layers: int = 4
               ) -> dict[str, Any]:
    """HSDP on 2 gloo ranks vs the unsharded model; prints a table and returns the numbers."""
    from omni_runtime.stages.models.flux.tiny import make_big_transformer

    world = 2
    with tempfile.TemporaryDirectory(prefix="bench-hsdp-") as tmp:
        path = str(Path(tmp) / "transformer")
        weights = make_big_transformer(path, num_layers=layers, num_single_layers=single_layers)
        load1 = _run("load1", world, path, tmp, tokens, pairs, threads)
        load2 = _run("load2", world, path, tmp, tokens, pairs, threads)
        steps = _run("step", world, path, tmp, tokens, pairs, threads)
    mb = 2 ** 20
    print(f"HSDP, {world} gloo ranks x {threads} thread(s), transformer of {weights / mb:.0f} MB fp32, "
          f"{tokens} image tokens + 16 text tokens, {pairs} alternated rounds")
    print(f"{'':28s}{'hsdp_shard 1':>14s}{'hsdp_shard 2':>14s}{'ratio':>8s}")
    loc1, loc2 = max(r["local_bytes"] for r in load1), max(r["local_bytes"] for r in load2)
    pk1, pk2 = max(r["peak_growth"] for r in load1), max(r["peak_growth"] for r in load2)
    print(f"{'param bytes per rank (MB)':28s}{loc1 / mb:14.1f}{loc2 / mb:14.1f}{loc2 / loc1:8.2f}")
    print(f"{'peak RSS growth, load (MB)':28s}{pk1 / mb:14.1f}{pk2 / mb:14.1f}{pk2 / pk1:8.2f}")
    t = steps[0]["times"]
    ratios = {name: statistics.median(a / b for a, b in zip(t[name], t["unsharded"], strict=True))
              for name in ("hsdp2", "hsdp2_prefetch")}
    med = {name: statistics.median(v) for name, v in t.items()}
    print(f"{'step latency (s)':28s}{med['unsharded']:14.3f}{med['hsdp2']:14.3f}{ratios['hsdp2']:8.2f}")
    print(f"{'  with forward prefetch':28s}{'':14s}{med['hsdp2_prefetch']:14.3f}{ratios['hsdp2_prefetch']:8.2f}")
    gathered = steps[0]["gathered_per_step"]
    print(f"all-gathered per step and rank: {gathered / mb:.1f} MB = {gathered / steps[0]['model_bytes']:.2f} x "
          f"the model ({(1 - 1 / world) * gathered / mb:.1f} MB received from the peer)")
    return {"weights": weights, "local": (loc1, loc2), "peak_growth": (pk1, pk2), "latency": med,
            "ratios": ratios, "gathered": gathered}


#: cfg section workloads: (name, requests, true CFG)
CFG_WORKLOADS: list[tuple[str, int, bool]] = [("true CFG, batch 1", 1, True), ("true CFG, batch 2", 2, True),
                                              ("no negative, batch 2", 2, False), ("no negative, batch 1", 1, False)]


def _cfg_rank(rank: int, world: int, port: int, path: str, out: str, tag: str, size: int, steps: int,
              threads: int, ready: Any, go: list[Any], done: list[Any]) -> None:
    """One rank of phase ``tag``: load, warm up, set ``ready``; then per round wait for ``go[i]``, run every
    workload once, write the numbers, set ``done[i]`` (the parent lets one phase run at a time)."""
    import torch

    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec
    from omni_runtime.parallel.strategies.cfg_parallel import assign_rows
    from omni_runtime.stages import DenoiseRequest, DenoiserStage
    from omni_runtime.stages.guidance import TRUE_CFG, UNGUIDED, mixed_rows

    torch.set_num_threads(threads)
    mesh = (Mesh.build(ParallelSpec(cfg=world), rank, f"tcp://127.0.0.1:{port}", "cpu") if world > 1
            else Mesh.single("cpu"))
    den = DenoiserStage.from_pretrained(path, "float32", "cpu", mesh=mesh)
    g = torch.Generator().manual_seed(0)

    def request(seed: int, cfg: bool) -> DenoiseRequest:
        text, pooled = den.config["joint_attention_dim"], den.config["pooled_projection_dim"]
        embeds = {"prompt_embeds": torch.randn(16, text, generator=g),
                  "pooled_prompt_embeds": torch.randn(pooled, generator=g)}
        neg = {"negative_prompt_embeds": torch.randn(16, text, generator=g),
               "negative_pooled_prompt_embeds": torch.randn(pooled, generator=g)}
        return DenoiseRequest(embeds={**embeds, **(neg if cfg else {})}, seed=seed, height=size, width=size,
                              num_inference_steps=steps, true_cfg_scale=4.0 if cfg else 1.0)

    den.denoise([request(0, True)])  # warm-up
    ready.set()
    row_bytes = (size // 16) ** 2 * den.in_channels * 4

    def measure() -> dict[str, Any]:
        result: dict[str, Any] = {}
        for name, n, cfg in CFG_WORKLOADS:
            reqs = [request(j, cfg) for j in range(n)]
            if world > 1:
                mesh.group("world").barrier()
            mesh.reset_comm_stats()
            t0 = time.perf_counter()
            den.denoise(reqs)
            elapsed = time.perf_counter() - t0
            stats = mesh.comm_stats()
            rows = mixed_rows(list(range(n)), [TRUE_CFG if cfg else UNGUIDED] * n, [0] * n)
            mine = len(assign_rows(rows, world)[mesh.rank("cfg")])
            result[name] = {"s": elapsed, "sent_per_step": stats.bytes_sent / steps,
                            "gathers_per_step": stats.calls.get("all_gather", 0) / steps,
                            "min_per_step": mine * row_bytes * (world - 1)}
        return result

    rank_rounds(out, tag, rank, go, done, measure)
    mesh.destroy()


def bench_cfg(size: int = 256, steps: int = 4, rounds: int = 3, cores: int = 2, preset: str = "small",
              timeout: float = 600) -> dict[str, Any]:
    """cfg 2 (``cores / 2`` threads per rank) vs cfg 1 (``cores`` threads, the baseline; and ``cores / 2``, the same
    threads as one cfg rank). Every phase's processes start (and warm up) once; then the phases take turns, one at a
    time, their order rotating per round. Prints a table, returns the numbers."""
    from omni_runtime.stages.models.flux.tiny import make_tiny_model

    half = max(1, cores // 2)
    phases = [("cfg1", 1, cores), ("cfg1_half", 1, half), ("cfg2", 2, half)]
    times: dict[str, dict[str, list[float]]] = {w[0]: {t: [] for t, _, _ in phases} for w in CFG_WORKLOADS}
    comm: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cfg-") as tmp:
        path = str(make_tiny_model(Path(tmp) / "model", preset=preset))
        worlds = {tag: world for tag, world, _ in phases}
        threads = {tag: t for tag, _, t in phases}

        def rank_args(tag: str, r: int, port: int) -> tuple:
            return (r, worlds[tag], port, path, tmp, tag, size, steps, threads[tag])

        for i, results in phase_rounds(_cfg_rank, worlds, rank_args, tmp, rounds, timeout, name="cfg bench: "):
            for tag, res in results.items():
                for name in times:
                    times[name][tag].append(max(x[name]["s"] for x in res))
                if tag == "cfg2":
                    comm = {name: [x[name] for x in res] for name in times}
            print(f"round {i}: " + "; ".join(f"{t} " + ", ".join(f"{times[n][t][-1]:.3f}" for n in times)
                                             for t, _, _ in phases) + " s", flush=True)
    print(f"CFG parallel, Flux preset {preset!r}, {size}x{size} ({(size // 16) ** 2} image tokens), {steps} steps, "
          f"{rounds} rounds (phases one at a time, order rotated): cfg 1 x {cores} thread(s) (baseline), cfg 1 x "
          f"{half} thread(s), cfg 2 x {half} thread(s) per rank; latency = median, ratio = median of per-round ratios")
    print(f"{'workload':22s}{'cfg1 (s)':>9s}{'cfg1/' + str(half) + 't':>9s}{'cfg2 (s)':>9s}{'cfg2/cfg1':>10s}"
          f"{'cfg2/cfg1_' + str(half) + 't':>13s}{'sent/step/rank':>16s}{'minimum':>10s}{'gathers/step':>13s}")
    ratios: dict[str, tuple[float, float]] = {}
    for name, t in times.items():
        ratios[name] = tuple(statistics.median(b / a for a, b in zip(t[base], t["cfg2"], strict=True))
                             for base in ("cfg1", "cfg1_half"))
        sent = statistics.mean(r["sent_per_step"] for r in comm[name])  # every rank sends the padded share
        minimum = statistics.mean(r["min_per_step"] for r in comm[name])
        gathers = max(r["gathers_per_step"] for r in comm[name])
        print(f"{name:22s}{statistics.median(t['cfg1']):9.3f}{statistics.median(t['cfg1_half']):9.3f}"
              f"{statistics.median(t['cfg2']):9.3f}{ratios[name][0]:10.2f}{ratios[name][1]:13.2f}"
              f"{sent / 1024:12.1f} KiB{minimum / 1024:6.1f} KiB{gathers:13.1f}")
    print("bytes: mean over the cfg ranks; minimum = the predictions of the rank's own rows to the cfg - 1 peers")
    return {"times": times, "ratios": ratios, "comm": comm}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="section", required=True)
    v = sub.add_parser("vae", help="VAE patch parallelism vs the single-rank and the tiled decode")
    v.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="square image sides (pixels)")
    v.add_argument("--patch", type=int, default=2)
    v.add_argument("--repeats", type=int, default=1)
    v.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    v.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    v.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    hs = sub.add_parser("hsdp", help="HSDP sharded vs unsharded: load memory, step latency, all-gathered bytes")
    hs.add_argument("--tokens", type=int, default=256, help="image tokens per step (a square)")
    hs.add_argument("--pairs", type=int, default=3, help="alternated rounds of the step latency phases")
    hs.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads per rank")
    hs.add_argument("--layers", type=int, default=2, help="double-stream blocks (2 -> ~216 MB with 4 single)")
    hs.add_argument("--single-layers", type=int, default=4, help="single-stream blocks")
    cf = sub.add_parser("cfg", help="CFG parallel: cfg 2 vs cfg 1 on the same cores, latency and bytes per step")
    cf.add_argument("--size", type=int, default=256, help="square image side (pixels)")
    cf.add_argument("--steps", type=int, default=4)
    cf.add_argument("--rounds", type=int, default=3, help="alternated rounds (median over them)")
    cf.add_argument("--cores", type=int, default=2, help="threads of cfg 1; cfg 2 runs cores / 2 per rank")
    cf.add_argument("--preset", choices=("tiny", "small"), default="small", help="Flux model preset")
    pp = sub.add_parser("pp", help="layer PP and PipeFusion vs one rank: throughput, bubble, latency, PSNR, bytes")
    pp.add_argument("--batches", type=int, nargs="+", default=[4, 8], help="requests per denoise call")
    pp.add_argument("--size", type=int, default=256, help="square image side (pixels, a multiple of 16)")
    pp.add_argument("--steps", type=int, default=4)
    pp.add_argument("--repeats", type=int, default=1)
    pp.add_argument("--threads", type=int, default=2, help="threads of the one-rank baseline (pp ranks: half each)")
    acc = sub.add_parser("pp-accuracy", help="PipeFusion vs the exact run: PSNR and max |delta| per step count")
    acc.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    acc.add_argument("--size", type=int, default=128)
    acc.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.section == "vae":
        print("\n".join(vae_section(args)))
    elif args.section == "cfg":
        bench_cfg(args.size, args.steps, args.rounds, args.cores, args.preset)
    elif args.section == "pp":
        from bench_pp import pp_section  # tools/ is this script's directory

        print("\n".join(pp_section(args.batches, args.size, args.steps, args.repeats, args.threads)))
    elif args.section == "pp-accuracy":
        from bench_pp import accuracy_section

        print("\n".join(accuracy_section(args.steps, args.size, args.warmup)))
    else:
        bench_hsdp(args.tokens, args.pairs, args.threads, args.layers, args.single_layers)


if __name__ == "__main__":
    main()
