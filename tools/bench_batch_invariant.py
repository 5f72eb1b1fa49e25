"""The cost of ``[stages.denoiser] batch_invariant = true``: time per denoising step of a running set of ``k``
requests, batched (one forward) vs batch-invariant (one forward per request), in this process, phases alternating;
and whether each mode's result equals the solo run (max relative difference of the latents; 0 = bit-identical).

Usage: ``python tools/bench_batch_invariant.py [--preset tiny] [--size 256x256] [--k 1,2,4,8] [--steps 4]
[--rounds 3] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--size", default="256x256")
    p.add_argument("--k", default="1,2,4,8", help="requests in the running set")
    p.add_argument("--steps", type=int, default=4, help="steps timed per phase")
    p.add_argument("--rounds", type=int, default=3, help="alternating (batched, invariant) pairs")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from omni_runtime.runtime.model_store import ensure_model
    from omni_runtime.stages.denoiser import DenoiseRequest, DenoiserStage
    from omni_runtime.stages.step_batch import RunningSet

    stage = DenoiserStage.from_pretrained(ensure_model(str(ROOT / "models" / f"{args.preset}-flux")))
    w, h = (int(x) for x in args.size.split("x"))
    txt, dim = 77, int(stage.joint_attention_dim or 32)

    def req(i: int) -> DenoiseRequest:
        g = torch.Generator().manual_seed(i)
        return DenoiseRequest(prompt_embeds=torch.randn(txt, dim, generator=g),
                              pooled_prompt_embeds=torch.randn(int(stage.pooled_projection_dim or dim), generator=g),
                              seed=i, height=h, width=w, num_inference_steps=args.steps)

    def run(k: int, invariant: bool, only: int | None = None) -> tuple[float, dict[int, torch.Tensor]]:
        rs = RunningSet(stage, batch_invariant=invariant)
        for i in range(k) if only is None else (only,):
            rs.admit(i, req(i))
        out: dict[int, torch.Tensor] = {}
        t0 = time.perf_counter()
        while len(rs):
            out.update(rs.step())
        return (time.perf_counter() - t0) / args.steps, out

    solo = {i: run(1, True, only=i)[1][i] for i in range(max(int(k) for k in args.k.split(",")))}
    print(f"\nbench_batch_invariant: preset {args.preset}, {args.size}, {args.steps} steps, {args.threads} threads, "
          f"{args.rounds} alternating rounds")
    print(f"{'k':>3} {'batched ms/step':>16} {'invariant ms/step':>18} {'invariant/batched':>18} "
          f"{'batched rel vs solo':>20} {'invariant rel vs solo':>22}")
    for k in (int(x) for x in args.k.split(",")):
        run(k, False)  # warm-up
        pairs, rel = [], {False: 0.0, True: 0.0}
        for _ in range(args.rounds):
            for inv in (False, True):
                dt, out = run(k, inv)
                pairs.append((inv, dt))
                for i, x in out.items():
                    rel[inv] = max(rel[inv], float((x - solo[i]).abs().max() / solo[i].abs().max()))
        b = statistics.median(dt for inv, dt in pairs if not inv)
        v = statistics.median(dt for inv, dt in pairs if inv)
        ratios = [pairs[2 * r + 1][1] / pairs[2 * r][1] for r in range(args.rounds)]
        print(f"{k:>3} {b * 1000:>16.1f} {v * 1000:>18.1f} {statistics.median(ratios):>17.2f}x "
              f"{rel[False]:>20.2e} {rel[True]:>22.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
