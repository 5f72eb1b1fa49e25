"""Sequence-parallel scaling of the Wan denoiser on a long video sequence (issue 24): ulysses 2 and ring 2 against one
rank, on the same cores.

The model is the embedded ``small-wan`` preset (random weights); one request of ``--frames`` frames at ``--size``
(``(frames - 1) / 4 + 1`` latent frames of ``(H / 16) x (W / 16)`` tokens: 49 frames at 320x320 are 5200 video tokens
per forward), ``--steps`` steps, CFG with a negative prompt (2 rows per step), text embeddings random (the text
encoder is not what is measured). Phases, each in its own processes started and warmed up once:

- ``sp1``: one rank with ``--cores`` threads (the baseline); ``sp1_1t``: one rank with one thread (the same threads
  as one SP rank: the baseline of the CPU-time ratio);
- ``ulysses2`` / ``ring2``: 2 gloo ranks, ``cores / 2`` threads each.

Every process is pinned to the same ``--cores`` CPUs (``os.sched_setaffinity``), so SP 2 gets no core the baseline
lacks: on a CPU-only host it can only add its exchanges, and the ratio measures that overhead. The phases run one at
a time, their order rotated per round; the table gives the median latency and the median of the per-round ratios to
``sp1``, the process CPU time summed over the ranks and its ratio to ``sp1_1t`` (the work SP 2 adds, which a
machine shared with other jobs does not distort the way it distorts wall time: a phase with more processes gets a
larger share of contended cores), and the bytes each rank sent per step (``Mesh.comm_stats``).

    python tools/bench_video_sp.py [--size 320x320] [--frames 49] [--steps 2] [--rounds 3] [--cores 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phase_rounds import phase_rounds, rank_rounds  # noqa: E402
from serve_process import ensure_model  # noqa: E402

#: phase -> (ranks, its parallel degrees)
#: phase -> (ranks, threads per rank: None = cores / ranks, its parallel degrees)
PHASES: dict[str, tuple[int, int | None, dict[str, int]]] = {
    "sp1": (1, None, {}), "sp1_1t": (1, 1, {}), "ulysses2": (2, None, {"ulysses": 2}), "ring2": (2, None, {"ring": 2})}


def _threads(tag: str, cores: int) -> int:
    world, threads, _ = PHASES[tag]
    return threads or max(1, cores // world)


def _rank(rank: int, tag: str, port: int, path: str, out: str, args: dict[str, Any], cpus: list[int],
          ready: Any, go: list[Any], done: list[Any]) -> None:
    """One rank of phase ``tag``: load, warm up, set ``ready``; per round wait for ``go[i]``, denoise once, write
    the numbers, set ``done[i]``."""
    import torch

    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec
    from omni_runtime.stages import DenoiseRequest, DenoiserStage

    os.sched_setaffinity(0, cpus)
    world, _, degrees = PHASES[tag]
    torch.set_num_threads(_threads(tag, len(cpus)))
    mesh = (Mesh.build(ParallelSpec(**degrees), rank, f"tcp://127.0.0.1:{port}", "cpu") if world > 1
            else Mesh.single("cpu"))
    den = DenoiserStage.from_pretrained(path, "float32", "cpu", mesh=mesh)
    g = torch.Generator().manual_seed(0)
    text = int(den.config["text_dim"])
    embeds = {"prompt_embeds": torch.randn(512, text, generator=g),
              "negative_prompt_embeds": torch.randn(512, text, generator=g)}
    width, height = args["width"], args["height"]

    def request(steps: int) -> DenoiseRequest:
        return DenoiseRequest(embeds=embeds, seed=0, height=height, width=width, num_inference_steps=steps,
                              true_cfg_scale=5.0, num_frames=args["frames"])

    den.denoise([request(1)])  # warm-up
    ready.set()

    def measure() -> dict[str, float]:
        if world > 1:
            mesh.group("world").barrier()
        mesh.reset_comm_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        den.denoise([request(args["steps"])])
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        sent = mesh.comm_stats().bytes_sent / args["steps"] if world > 1 else 0
        return {"s": elapsed, "cpu": cpu, "sent_per_step": sent}

    rank_rounds(out, tag, rank, go, done, measure)
    mesh.destroy()


def bench(size: str, frames: int, steps: int, rounds: int, cores: int, timeout: float = 3000) -> dict[str, Any]:
    width, height = (int(v) for v in size.lower().split("x"))
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    path = str(ensure_model("small", "wan"))
    args = {"width": width, "height": height, "frames": frames, "steps": steps}
    times: dict[str, list[float]] = {t: [] for t in PHASES}
    cpu_s: dict[str, list[float]] = {t: [] for t in PHASES}
    sent: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-video-sp-") as tmp:

        def rank_args(tag: str, r: int, port: int) -> tuple:
            return (r, tag, port, path, tmp, args, cpus)

        worlds = {tag: world for tag, (world, _, _) in PHASES.items()}
        for i, results in phase_rounds(_rank, worlds, rank_args, tmp, rounds, timeout):
            for tag, res in results.items():
                times[tag].append(max(x["s"] for x in res))
                cpu_s[tag].append(sum(x["cpu"] for x in res))
                sent[tag] = statistics.mean(x["sent_per_step"] for x in res)
            print(f"round {i}: " + ", ".join(f"{t} {times[t][-1]:.2f} s" for t in PHASES), flush=True)
    tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    print(f"small-wan denoiser, {size}, {frames} frames ({tokens} video tokens per row), {steps} steps, CFG (2 rows), "
          f"{rounds} rounds (phases one at a time, order rotated), every rank pinned to CPUs {cpus}")
    print(f"{'phase':<10}{'ranks x threads':>16}{'median s':>10}{'/ sp1':>8}{'CPU s':>8}{'CPU / sp1_1t':>14}"
          f"{'sent/step/rank':>17}")
    ratios, cpu_ratios = {}, {}
    for tag, (world, _, _) in PHASES.items():
        ratios[tag] = statistics.median(a / b for a, b in zip(times[tag], times["sp1"], strict=True))
        cpu_ratios[tag] = statistics.median(a / b for a, b in zip(cpu_s[tag], cpu_s["sp1_1t"], strict=True))
        print(f"{tag:<10}{f'{world} x {_threads(tag, len(cpus))}':>16}{statistics.median(times[tag]):>10.2f}"
              f"{ratios[tag]:>8.2f}{statistics.median(cpu_s[tag]):>8.2f}{cpu_ratios[tag]:>14.2f}"
              f"{sent[tag] / 2**20:>13.2f} MiB")
    print("CPU s: process CPU time summed over the phase's ranks (what the phase computed, whatever share of the "
          "cores the OS gave it); gloo waits block, they do not spin")
    return {"times": times, "ratios": ratios, "cpu": cpu_s, "cpu_ratios": cpu_ratios, "sent": sent}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="320x320", help="WIDTHxHEIGHT of the video (multiples of 16)")
    p.add_argument("--frames", type=int, default=49, help="4 k + 1 frames")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cores", type=int, default=2, help="the CPUs every phase is pinned to (the same ones)")
    a = p.parse_args(argv)
    if (a.frames - 1) % 4:
        p.error(f"--frames {a.frames}: allowed: 4 k + 1")
    bench(a.size, a.frames, a.steps, a.rounds, a.cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
