"""Arrival-process benchmark: step-level vs request-level denoiser scheduling under Poisson load.

``python tools/bench_serving.py arrivals [--preset tiny] [--size 64x64] [--requests 24] [--loads 0.5,0.8,0.95]
[--seed 0]`` (or run this file directly with the same flags).

Two servers run side by side on the same config but ``[stages.denoiser] scheduling`` ("request": the old policy,
a batch of one step count runs all its steps; "step": requests join and leave at every step). First the capacity
is measured (requests/s when ``--requests`` requests of the mix arrive at once, request-level server, median of both
servers). Then for each load (a fraction of that capacity) one arrival trace is drawn with ``--seed``: Poisson
arrivals, step counts drawn from {4, 8, 28, 50}; the same trace runs against both servers, phases alternating
(request, step, request, step, ...). Reported per load and policy: p50/p99 latency, throughput (requests / span
from the first arrival to the last answer) and the p99 latency of the short requests (4 or 8 steps).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import ServeProcess, config_text, ensure_model  # noqa: E402

logger = logging.getLogger(__name__)
STEP_CHOICES = (4, 8, 28, 50)
SHORT = 8  # requests with at most this many steps are "short"


class PolicyServer(ServeProcess):
    """``omni-runtime serve`` with ``[stages.denoiser] scheduling = <policy>`` and no per-request work cap."""

    def __init__(self, model: Path, policy: str, max_batch: int) -> None:
        def edit(text: str) -> str:
            text = text.replace("[stages.denoiser]\n", f'[stages.denoiser]\nscheduling = "{policy}"\n', 1)
            return text.replace("max_queue = 64", "max_queue = 1024")

        self.policy = policy
        super().__init__(config_text(model, max_batch, edit), name=f"arrivals-{policy}")


def trace(n: int, rate: float, seed: int) -> list[tuple[float, int]]:
    """``n`` (arrival offset in s, steps): Poisson arrivals at ``rate``/s, steps uniform over STEP_CHOICES."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append((t, rng.choice(STEP_CHOICES)))
        t += rng.expovariate(rate)
    return out


def replay(server: PolicyServer, arrivals: list[tuple[float, int]], size: str) -> tuple[list[tuple[int, float]], float]:
    """Send each request at its arrival time (one thread each); returns [(steps, latency)] and the span (s) from
    the first arrival to the last answer."""
    lat: list[tuple[int, float]] = [(0, 0.0)] * len(arrivals)
    errors: list[BaseException] = []
    start = time.perf_counter() + 0.2

    def one(i: int, at: float, steps: int) -> None:
        time.sleep(max(0.0, start + at - time.perf_counter()))
        try:
            lat[i] = (steps, server.post({"prompt": f"request {i}", "seed": i, "size": size,
                                          "num_inference_steps": steps}))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, at, steps)) for i, (at, steps) in enumerate(arrivals)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return lat, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--size", default="64x64")
    p.add_argument("--requests", type=int, default=24, help="requests per phase (and for the capacity probe)")
    p.add_argument("--loads", default="0.5,0.8,0.95", help="fractions of the measured capacity")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model = ensure_model(args.preset)
    servers: dict[str, PolicyServer] = {}
    try:
        for pol in ("request", "step"):
            servers[pol] = PolicyServer(model, pol, args.max_batch)
        for s in servers.values():
            s.post({"prompt": "warm", "size": args.size, "num_inference_steps": 2})
        burst = [(0.0, steps) for _, steps in trace(args.requests, 1.0, args.seed)]
        caps = {}
        for pol, s in servers.items():
            _, span = replay(s, burst, args.size)
            caps[pol] = args.requests / span
        capacity = caps["request"]
        print(f"\nbench arrivals: preset {args.preset}, {args.size}, steps from {STEP_CHOICES}, {args.requests} "
              f"requests per phase, seed {args.seed}, max_batch_size {args.max_batch}")
        print(f"capacity (all {args.requests} at once): request-level {caps['request']:.2f} req/s, step-level "
              f"{caps['step']:.2f} req/s; loads are fractions of the request-level one")
        print(f"{'load':>5} {'policy':>8} {'p50 s':>8} {'p99 s':>8} {'req/s':>7} {'short p99 s':>12}")
        summary = []
        for load in (float(x) for x in args.loads.split(",")):
            arrivals = trace(args.requests, load * capacity, args.seed)
            got = {}
            for pol in ("request", "step"):  # alternating phases, the same trace
                lat, span = replay(servers[pol], arrivals, args.size)
                all_l = [x for _, x in lat]
                short = [x for s, x in lat if s <= SHORT] or [0.0]
                got[pol] = (pct(all_l, 0.5), pct(all_l, 0.99), len(lat) / span, pct(short, 0.99))
                print(f"{load:>5.2f} {pol:>8} {got[pol][0]:>8.2f} {got[pol][1]:>8.2f} {got[pol][2]:>7.2f} "
                      f"{got[pol][3]:>12.2f}")
            summary.append((load, got["step"][3] / got["request"][3], got["step"][2] / got["request"][2]))
        print("\nstep / request: short-request p99 ratio, throughput ratio")
        for load, short_ratio, tput_ratio in summary:
            print(f"  load {load:.2f}: short p99 {short_ratio:.2f}x, throughput {tput_ratio:.2f}x")
    finally:
        for s in servers.values():
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
