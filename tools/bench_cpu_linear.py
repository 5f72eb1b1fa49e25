"""The linear kernel on CPU: torch's ``F.linear`` (its BLAS) vs oneDNN (``stages/cpu_linear.py``), per shape.

For every linear shape of the ``small`` preset's transformer at one 256x256 image (768 tokens: 512 text + 256
image) it times torch's ``F.linear``, oneDNN's linear, and linear + GELU(tanh) both ways, alternating the phases
in every round, and prints the median time and GFLOP/s of each and the median of the per-round ratios
oneDNN / torch. The model-level effect is ``tools/profile_denoiser.py --phases diffusers,inproc,inproc:torch``.

Usage: ``python tools/bench_cpu_linear.py [--rounds 15] [--tokens 768]``. Ratios matter; times depend on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from omni_runtime.stages.cpu_linear import onednn_available

DIM = 384  # small preset: 6 heads x 64
SHAPES = [(DIM, DIM), (DIM, 4 * DIM), (4 * DIM, DIM), (5 * DIM, DIM)]  # (in, out): q/k/v/out, MLP up, down, proj_out


def _time(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--tokens", type=int, default=768)
    p.add_argument("--calls", type=int, default=10, help="calls per timed phase")
    args = p.parse_args(argv)
    if not onednn_available():
        print("this torch build has no oneDNN linear: nothing to compare")
        return 1
    op = torch.ops.mkldnn._linear_pointwise
    print(f"bench_cpu_linear: {args.tokens} tokens, {torch.get_num_threads()} threads, {args.rounds} rounds "
          f"alternating; torch {torch.__version__}")
    print(f"{'in -> out':14} {'torch ms':>9} {'oneDNN ms':>10} {'ratio':>7} {'GFLOP/s':>15}   "
          f"{'+gelu torch':>11} {'+gelu oneDNN':>12} {'ratio':>7}")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, n in SHAPES:
            x, w, b = torch.randn(1, args.tokens, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5, \
                torch.randn(n, generator=g)
            phases = {"torch": lambda x=x, w=w, b=b: F.linear(x, w, b),
                      "onednn": lambda x=x, w=w, b=b: op(x, w, b, "none", [], ""),
                      "gelu torch": lambda x=x, w=w, b=b: F.gelu(F.linear(x, w, b), approximate="tanh"),
                      "gelu onednn": lambda x=x, w=w, b=b: op(x, w, b, "gelu", [], "tanh")}
            err = (phases["onednn"]() - phases["torch"]()).abs().max().item()
            for fn in phases.values():  # warm-up
                _time(fn, 3)
            times: dict[str, list[float]] = {name: [] for name in phases}
            for _ in range(args.rounds):
                for name, fn in phases.items():
                    times[name].append(_time(fn, args.calls))
            med = {name: statistics.median(v) for name, v in times.items()}

            def ratio(a: str, b: str, times: dict[str, list[float]] = times) -> float:
                return statistics.median(t_b / t_a for t_a, t_b in zip(times[a], times[b], strict=True))

            flop = 2 * args.tokens * k * n
            print(f"{k:>5} -> {n:<5} {med['torch'] * 1e3:>9.2f} {med['onednn'] * 1e3:>10.2f} "
                  f"{ratio('torch', 'onednn'):>6.2f}x {flop / med['torch'] / 1e9:>6.0f} / {flop / med['onednn'] / 1e9:<6.0f}"
                  f"   {med['gelu torch'] * 1e3:>11.2f} {med['gelu onednn'] * 1e3:>12.2f} "
                  f"{ratio('gelu torch', 'gelu onednn'):>6.2f}x   (max |diff| {err:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
