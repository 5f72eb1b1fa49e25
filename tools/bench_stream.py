"""Streaming benchmark: what partial images (``stream: true, partial_images``) cost the requests beside them, and how
early the first partial arrives, through ``serve`` on one server.

Every round sends ``--clients`` concurrent requests (each client ``--per-client`` in a row), in three phases that
alternate (none, one, all, none, one, all, ...) with a pause before each:

- ``none``: no request streams (the baseline);
- ``one``: client 0 streams with ``partial_images = --partials``, the others do not;
- ``all``: every client streams.

Reported: the median latency of the non-streamed requests of ``one`` over ``none`` (what one streamer's previews cost
its neighbours), the median full latency of the streamed requests of ``all`` over the plain requests of ``none``
(the cost when everybody streams), and the time to the first partial over the full latency of a streamed request
(the median of its ratios). The ratios are medians of per-round ratios, so a noisy neighbour hits both sides alike.

Usage: ``python tools/bench_stream.py [--preset small] [--size 256x256] [--steps 12] [--partials 3] [--clients 4]
[--per-client 2] [--rounds 3]``. Prints a table; ratios matter, absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import ServeProcess, config_text, ensure_model  # noqa: E402

logger = logging.getLogger(__name__)

PAUSE_S = 1.0
PROMPT = "a lighthouse on a cliff at dusk"


def _streamed(server: ServeProcess, body: dict) -> tuple[float, float, int]:
    """(seconds to the first partial, seconds to the end, partial events) of one streamed request."""
    t0 = time.perf_counter()
    first, partials = 0.0, 0
    with server.client().stream("POST", "/v1/images/generations", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:2000]!r}")
        for line in r.iter_lines():
            if line.startswith("data: "):
                kind = json.loads(line[6:])["type"]
                if kind == "error":
                    raise RuntimeError(line)
                if kind.endswith("partial_image"):
                    partials += 1
                    first = first or time.perf_counter() - t0
    return first, time.perf_counter() - t0, partials


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--size", default="256x256")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--partials", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--per-client", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = ServeProcess(config_text(ensure_model(args.preset)), name="bench-stream")
    seed = [0]

    def client(k: int, stream: bool) -> list[tuple[bool, float, float]]:
        out = []
        for _ in range(args.per_client):
            seed[0] += 1
            body = {"prompt": PROMPT, "size": args.size, "num_inference_steps": args.steps, "seed": seed[0]}
            if stream:
                first, full, n = _streamed(server, {**body, "stream": True, "partial_images": args.partials})
                assert n >= 1, "no partial image arrived"
                out.append((True, first, full))
            else:
                out.append((False, 0.0, server.post(body)))
        return out

    def phase(streamers: int) -> list[tuple[bool, float, float]]:
        time.sleep(PAUSE_S)
        with concurrent.futures.ThreadPoolExecutor(args.clients) as ex:
            runs = list(ex.map(lambda k: client(k, k < streamers), range(args.clients)))
        return [r for run in runs for r in run]

    try:
        phase(args.clients)  # warm-up: first-call costs, streamed and not
        rounds = []
        for _ in range(args.rounds):
            rounds.append({name: phase(n) for name, n in (("none", 0), ("one", 1), ("all", args.clients))})
    finally:
        server.stop()

    def med(rs: list[tuple[bool, float, float]], streamed: bool) -> float:
        return statistics.median(full for s, _, full in rs if s == streamed)

    others = [med(r["one"], False) / med(r["none"], False) for r in rounds]
    everyone = [med(r["all"], True) / med(r["none"], False) for r in rounds]
    ttfp = [first / full for r in rounds for s, first, full in r["all"] + r["one"] if s]
    none_s = statistics.median(med(r["none"], False) for r in rounds)
    first_s = statistics.median(first for r in rounds for s, first, _ in r["all"] if s)
    print(f"\n{args.preset}-flux, {args.size}, {args.steps} steps, partial_images = {args.partials}, "
          f"{args.clients} clients x {args.per_client} requests, {args.rounds} rounds, float32 CPU")
    print("| measure | value |")
    print("|---|---|")
    print(f"| latency of a plain request, nobody streams (median) | {none_s:.2f} s |")
    print(f"| latency of the plain requests beside one streamer / nobody streams | {statistics.median(others):.2f}x |")
    print(f"| latency of a streamed request when all stream / plain request, nobody streams | "
          f"{statistics.median(everyone):.2f}x |")
    print(f"| time to first partial, all stream (median) | {first_s:.2f} s |")
    print(f"| time to first partial / full latency of the same streamed request (median) | "
          f"{statistics.median(ttfp):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
