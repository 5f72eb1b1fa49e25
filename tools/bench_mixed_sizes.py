"""When ``[stages.denoiser] mixed_sizes = true`` pays: time per denoising step of a running set of ``k`` requests of
two image sizes, mixed (one padded, masked forward) vs separate (one forward per size, the default), in this process,
phases alternating; the padding waste of the mixed forward, and each mode's largest difference to the solo runs
(max relative difference of the latents).

Usage: ``python tools/bench_mixed_sizes.py [--preset tiny] [--sizes 256x256,272x208] [--k 2,4,8] [--steps 4]
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
    p.add_argument("--sizes", default="256x256,272x208", help="two WxH sizes; requests alternate between them")
    p.add_argument("--k", default="2,4,8", help="requests in the running set")
    p.add_argument("--steps", type=int, default=4, help="steps timed per phase")
    p.add_argument("--rounds", type=int, default=3, help="alternating (separate, mixed) pairs")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from omni_runtime.runtime.model_store import ensure_model
    from omni_runtime.stages.denoiser import DenoiseRequest, DenoiserStage
    from omni_runtime.stages.step_batch import RunningSet

    plain = DenoiserStage.from_pretrained(ensure_model(str(ROOT / "models" / f"{args.preset}-flux")))
    mixed = DenoiserStage(plain.model, plain.config, plain.schedule, plain.vae_scale_factor, plain.dtype,
                          plain.device, mixed_sizes=True)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    txt, dim = 77, int(plain.joint_attention_dim or 32)

    def req(i: int) -> DenoiseRequest:
        g = torch.Generator().manual_seed(i)
        w, h = sizes[i % len(sizes)]
        return DenoiseRequest(prompt_embeds=torch.randn(txt, dim, generator=g),
                              pooled_prompt_embeds=torch.randn(int(plain.pooled_projection_dim or dim), generator=g),
                              seed=i, height=h, width=w, num_inference_steps=args.steps)

    def run(stage: DenoiserStage, ids: list[int]) -> tuple[float, dict[int, torch.Tensor], float]:
        rs = RunningSet(stage)
        for i in ids:
            rs.admit(i, req(i))
        out: dict[int, torch.Tensor] = {}
        t0 = time.perf_counter()
        while len(rs):
            out.update(rs.step())
        return (time.perf_counter() - t0) / args.steps, out, rs.padding_waste

    ks = [int(k) for k in args.k.split(",")]
    solo = {i: run(plain, [i])[1][i] for i in range(max(ks))}
    print(f"\nbench_mixed_sizes: preset {args.preset}, sizes {args.sizes}, {args.steps} steps, {args.threads} "
          f"threads, {args.rounds} alternating rounds")
    print(f"{'k':>3} {'separate ms/step':>17} {'mixed ms/step':>14} {'mixed/separate':>15} {'waste':>6} "
          f"{'separate rel':>13} {'mixed rel':>10}")
    for k in ks:
        run(mixed, list(range(k)))  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        rel, waste = {False: 0.0, True: 0.0}, 0.0
        for _ in range(args.rounds):
            for m in (False, True):
                dt, out, w = run(mixed if m else plain, list(range(k)))
                times[m].append(dt)
                waste = max(waste, w)
                for i, x in out.items():
                    rel[m] = max(rel[m], float((x - solo[i]).abs().max() / solo[i].abs().max()))
        ratio = statistics.median(b / a for a, b in zip(times[False], times[True], strict=True))
        print(f"{k:>3} {statistics.median(times[False]) * 1000:>17.1f} {statistics.median(times[True]) * 1000:>14.1f} "
              f"{ratio:>14.2f}x {waste:>6.3f} {rel[False]:>13.2e} {rel[True]:>10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
