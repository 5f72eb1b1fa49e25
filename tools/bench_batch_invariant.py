"""The cost of ``[stages.denoiser] batch_invariant = true``: time per denoising step of a running set of ``k``
requests, batched (one forward) vs batch-invariant (one forward per request), in this process, phases alternating;
and whether each mode's result equals the solo run (max relative difference of the latents; 0 = bit-identical).

Usage: ``python tools/bench_batch_invariant.py [--preset tiny] [--size 256x256] [--k 1,2,4,8] [--steps 4]
[--rounds 3] [--threads 2]``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from running_set_bench import drain, parser, rel_diff, request, setup  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, k="1,2,4,8", rounds_help="alternating (batched, invariant) pairs")
    p.add_argument("--size", default="256x256")
    args = p.parse_args(argv)
    stage = setup(args)
    from omni_runtime.stages.step_batch import RunningSet

    w, h = (int(x) for x in args.size.split("x"))

    def run(k: int, invariant: bool, only: int | None = None) -> tuple[float, dict]:
        ids = range(k) if only is None else (only,)
        return drain(RunningSet(stage, batch_invariant=invariant), {i: request(stage, i, w, h, args.steps)
                                                                     for i in ids}, args.steps)

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
                    rel[inv] = max(rel[inv], rel_diff(x, solo[i]))
        b = statistics.median(dt for inv, dt in pairs if not inv)
        v = statistics.median(dt for inv, dt in pairs if inv)
        ratios = [pairs[2 * r + 1][1] / pairs[2 * r][1] for r in range(args.rounds)]
        print(f"{k:>3} {b * 1000:>16.1f} {v * 1000:>18.1f} {statistics.median(ratios):>17.2f}x "
              f"{rel[False]:>20.2e} {rel[True]:>22.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
