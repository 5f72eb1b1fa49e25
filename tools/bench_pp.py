"""Pipeline parallelism benchmark (``bench_parallel.py pp``): layer PP and PipeFusion against one rank.

Same model (the ``small`` preset of ``make_tiny_model``, written to a temporary directory), fp32 on CPU, fresh gloo
processes per phase, phases alternated per repeat, medians over the repeats:

- ``pp1``: one rank with ``--threads 2`` threads (the baseline, and the exact reference);
- ``pp2``: layer PP over 2 ranks with 1 thread each, one micro-batch per row (``pp_microbatches = 0``);
- ``pipefusion2``: PipeFusion over 2 ranks x 1 thread, 2 patches, 1 warm-up step (batch 1 only: latency).

Reported: throughput (images/s) at each batch, pp2 / pp1; the measured bubble fraction of each pp rank (the share
of its forward time not spent computing: waiting to receive, sending, the final broadcast) against the GPipe bound
``(S-1)/(m+S-1)`` for ``m`` micro-batches; bytes each rank sent per denoising step (the communicator's count: the
activations, the metadata, the prediction broadcast) against the theoretical minimum; PipeFusion's latency against
layer PP's at batch 1 and its PSNR / max |delta| of the decoded image against ``pp1``'s.

    python tools/bench_parallel.py pp --batches 4 8 --size 256 --steps 4 --repeats 1
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from omni_runtime.runtime.launcher import free_port

PHASES = {"pp1": (1, "layer"), "pp2": (2, "layer"), "pipefusion2": (2, "pipefusion")}
TEXT_TOKENS = 16


def _requests(cfg: dict, batch: int, size: int, steps: int) -> list:
    from omni_runtime.stages import DenoiseRequest

    g = torch.Generator().manual_seed(0)
    return [DenoiseRequest(embeds={"prompt_embeds": torch.randn(TEXT_TOKENS, cfg["joint_attention_dim"], generator=g),
                                   "pooled_prompt_embeds": torch.randn(cfg["pooled_projection_dim"], generator=g)},
                           seed=i, height=size, width=size, num_inference_steps=steps) for i in range(batch)]


def _worker(rank: int, world: int, port: int, model: str, out: str, phase: str, batch: int, size: int, steps: int,
            threads: int, warmup: int) -> None:
    torch.set_num_threads(threads)
    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec
    from omni_runtime.stages import DenoiserStage

    pp, mode = PHASES[phase]
    mesh = None
    if pp > 1:
        mesh = Mesh.build(ParallelSpec(pp=pp, pp_mode=mode, pipefusion_warmup=warmup), rank, f"tcp://127.0.0.1:{port}", "cpu")
    den = DenoiserStage.from_pretrained(model, "float32", "cpu", mesh=mesh)
    den.denoise(_requests(den.config, 1, size, 2))  # warm-up: thread pools, gloo buffers, a stale step
    stats = getattr(den.forward_rows, "stats", None)
    if stats is not None:
        stats.reset()
    den.mesh.reset_comm_stats()
    if mesh is not None:
        mesh.group("pp").barrier()
    t0 = time.perf_counter()
    latents = den.denoise(_requests(den.config, batch, size, steps))
    dt = time.perf_counter() - t0
    res: dict[str, Any] = {"seconds": dt, "sent": den.mesh.comm_stats().bytes_sent,
                           "by_kind": den.mesh.comm_stats().bytes_by_kind, "dim": den.model.config.inner_dim}
    if stats is not None:
        res.update(compute=stats.compute_s, total=stats.total_s, units=stats.microbatches, steps=stats.steps)
    if rank == 0:
        np.save(Path(out) / f"{phase}-{batch}.npy", torch.stack(latents).numpy(), allow_pickle=False)
    Path(out, f"{phase}-{batch}-rank{rank}.json").write_text(json.dumps(res))
    if mesh is not None:
        mesh.group("pp").barrier()
        mesh.destroy()


def _run(phase: str, model: str, out: str, batch: int, size: int, steps: int, threads: int,
         warmup: int = 1) -> list[dict]:
    world = PHASES[phase][0]
    mp.start_processes(_worker, args=(world, free_port(), model, out, phase, batch, size, steps, threads, warmup),
                       nprocs=world, start_method="spawn", join=True)
    return [json.loads(Path(out, f"{phase}-{batch}-rank{r}.json").read_text()) for r in range(world)]


def _images(model: str, latents: np.ndarray, size: int) -> np.ndarray:
    from omni_runtime.stages import VaeDecoderStage

    vae = VaeDecoderStage.from_pretrained(model, "float32", "cpu")
    return np.stack([vae.decode(torch.from_numpy(x), size, size)[0] for x in latents])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def pp_section(batches: list[int], size: int, steps: int, repeats: int, threads: int = 2) -> list[str]:
    """Run the phases and return the table's lines."""
    from omni_runtime.stages.models.flux.tiny import make_tiny_model

    tokens = (size // 16) ** 2
    lines = [f"pipeline parallel, preset small, fp32 on CPU, {size}x{size} ({tokens} image + {TEXT_TOKENS} text "
             f"tokens), {steps} steps; pp1 = 1 rank x {threads} threads, pp2 / pipefusion2 = 2 ranks x 1 thread; "
             f"{repeats} repeat(s), phases alternated, medians"]
    with tempfile.TemporaryDirectory(prefix="bench-pp-") as tmp:
        model = str(make_tiny_model(Path(tmp) / "small", preset="small", seed=0))
        results: dict[tuple[str, int], list[list[dict]]] = {}
        plan = [(p, b) for b in batches for p in ("pp1", "pp2")] + [("pp1", 1), ("pp2", 1), ("pipefusion2", 1)]
        for rep in range(repeats):
            for phase, batch in (plan if rep % 2 == 0 else plan[::-1]):
                th = threads if phase == "pp1" else max(1, threads // 2)
                results.setdefault((phase, batch), []).append(_run(phase, model, tmp, batch, size, steps, th))
        med = {k: statistics.median(max(r["seconds"] for r in run) for run in v) for k, v in results.items()}
        lines.append(f"{'batch':>6}{'pp1 img/s':>11}{'pp2 img/s':>11}{'pp2/pp1':>9}{'m':>4}{'bubble r0':>11}"
                     f"{'bubble r1':>11}{'GPipe bound':>13}")
        for b in batches:
            t1, t2 = med[("pp1", b)], med[("pp2", b)]
            run = results[("pp2", b)][-1]
            m = run[0]["units"] // run[0]["steps"]
            bub = [1 - r["compute"] / r["total"] for r in run]
            lines.append(f"{b:>6}{b / t1:>11.2f}{b / t2:>11.2f}{t1 / t2:>8.2f}x{m:>4}{bub[0]:>11.1%}{bub[1]:>11.1%}"
                         f"{(2 - 1) / (m + 2 - 1):>13.1%}")
        # bytes per step per rank vs the minimum (fp32): activations img + txt + temb, then the prediction
        dim = results[("pp2", batches[-1])][-1][0]["dim"]
        for b in batches:
            run = results[("pp2", b)][-1]
            act = b * (tokens + TEXT_TOKENS + 1) * dim * 4
            pred = b * tokens * 64 * 4
            lines.append(f"  bytes/step, layer pp2 batch {b}: rank 0 sent {run[0]['sent'] / steps:,.0f} (minimum: "
                         f"the activations, {act:,}), rank 1 sent {run[1]['sent'] / steps:,.0f} (minimum: the "
                         f"prediction to rank 0, {pred:,})")
        ref = np.load(Path(tmp) / "pp1-1.npy")
        lay, pf = np.load(Path(tmp) / "pp2-1.npy"), np.load(Path(tmp) / "pipefusion2-1.npy")
        imgs = _images(model, np.concatenate([ref, lay, pf]), size)
        run = results[("pipefusion2", 1)][-1]
        # the first step is synchronous (one unit: image + text + conditioning), the others send the text and the
        # conditioning once per patch (2 patches)
        pf_min = ((tokens + TEXT_TOKENS + 1) + (steps - 1) * (tokens + 2 * (TEXT_TOKENS + 1))) * dim * 4 // steps
        lines.append(f"  batch 1 latency: pp1 {med[('pp1', 1)]:.3f} s, layer pp2 {med[('pp2', 1)]:.3f} s, "
                     f"pipefusion2 {med[('pipefusion2', 1)]:.3f} s ({med[('pipefusion2', 1)] / med[('pp2', 1)]:.2f}x "
                     f"layer pp2)")
        lines.append(f"  decoded image vs pp1: layer pp2 max|d| {np.abs(imgs[1].astype(int) - imgs[0]).max()}/255, "
                     f"PSNR {_psnr(imgs[1], imgs[0]):.1f} dB; pipefusion2 max|d| "
                     f"{np.abs(imgs[2].astype(int) - imgs[0]).max()}/255, PSNR {_psnr(imgs[2], imgs[0]):.1f} dB")
        lines.append(f"  bytes/step, pipefusion2 batch 1: rank 0 sent {run[0]['sent'] / steps:,.0f} (minimum: the "
                     f"image once + text and conditioning per patch, {pf_min:,}), rank 1 sent "
                     f"{run[1]['sent'] / steps:,.0f} (minimum {tokens * 64 * 4:,})")
    return lines


def accuracy_section(steps_list: list[int], size: int = 128, warmup: int = 1, preset: str = "tiny") -> list[str]:
    """PipeFusion (2 ranks, 2 patches, ``warmup`` warm-up steps) against the exact one-rank run, per step count:
    PSNR and max |delta| of the decoded images (4 requests with random embeddings, seeds 0..3)."""
    from omni_runtime.stages.models.flux.tiny import make_tiny_model

    lines = [f"PipeFusion accuracy, preset {preset}, {size}x{size}, 2 ranks, 2 patches, {warmup} warm-up step(s), "
             f"4 images; against the exact one-rank run"]
    lines.append(f"{'steps':>6}{'PSNR dB (min over images)':>27}{'max|d| /255':>13}{'latent max|d|':>15}")
    with tempfile.TemporaryDirectory(prefix="bench-pf-") as tmp:
        model = str(make_tiny_model(Path(tmp) / preset, preset=preset, seed=0))
        for steps in steps_list:
            _run("pp1", model, tmp, 4, size, steps, 2)
            _run("pipefusion2", model, tmp, 4, size, steps, 1, warmup)
            ref, pf = np.load(Path(tmp) / "pp1-4.npy"), np.load(Path(tmp) / "pipefusion2-4.npy")
            imgs = _images(model, np.concatenate([ref, pf]), size)
            psnr = min(_psnr(imgs[4 + i], imgs[i]) for i in range(4))
            lines.append(f"{steps:>6}{psnr:>27.1f}{np.abs(imgs[4:].astype(int) - imgs[:4]).max():>13}"
                         f"{np.abs(pf - ref).max():>15.3g}")
    return lines
