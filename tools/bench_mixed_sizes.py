"""When ``[stages.denoiser] mixed_sizes = true`` pays: time per denoising step of a running set of ``k`` requests of
two image sizes, mixed (one padded, masked forward) vs separate (one forward per size, the default), in this process,
phases alternating; the padding waste of the mixed forward, and each mode's largest difference to the solo runs
(max relative difference of the latents).

Usage: ``python tools/bench_mixed_sizes.py [--preset tiny] [--sizes 256x256,272x208] [--k 2,4,8] [--steps 4]
[--rounds 3] [--threads 2]``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from running_set_bench import drain, parser, rel_diff, request, setup  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, k="2,4,8", rounds_help="alternating (separate, mixed) pairs")
    p.add_argument("--sizes", default="256x256,272x208", help="two WxH sizes; requests alternate between them")
    args = p.parse_args(argv)
    plain = setup(args)
    from omni_runtime.stages.denoiser import DenoiserStage
    from omni_runtime.stages.step_batch import RunningSet

    mixed = DenoiserStage(plain.model, plain.config, plain.schedule, plain.vae_scale_factor, plain.dtype,
                          plain.device, mixed_sizes=True)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]

    def run(stage: DenoiserStage, ids: list[int]) -> tuple[float, dict, float]:
        rs = RunningSet(stage)
        dt, out = drain(rs, {i: request(stage, i, *sizes[i % len(sizes)], args.steps) for i in ids}, args.steps)
        return dt, out, rs.padding_waste

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
                    rel[m] = max(rel[m], rel_diff(x, solo[i]))
        ratio = statistics.median(b / a for a, b in zip(times[False], times[True], strict=True))
        print(f"{k:>3} {statistics.median(times[False]) * 1000:>17.1f} {statistics.median(times[True]) * 1000:>14.1f} "
              f"{ratio:>14.2f}x {waste:>6.3f} {rel[False]:>13.2e} {rel[True]:>10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
