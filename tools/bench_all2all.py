"""Benchmark the CPU-capable all2all managers: time of dispatch + combine and bytes sent per rank.

Usage: ``python tools/bench_all2all.py [--worlds 2 4] [--tokens 256 2048 8192] [--hidden 1024] [--experts 8]
[--top-k 2] [--iters 5] [--threads 1]``

Each world runs in fresh gloo processes. For every token count, the backends run in rotating order each
iteration (phases alternated); a phase is ``dispatch -> a trivial per-row scale (no expert GEMMs) -> combine``
and its time is the slowest rank's. Routing is uniform random top-k. Bytes are what this rank sent to other
ranks (the communicator's counters), averaged over ranks, against each scheme's theoretical minimum and the
routing lower bound (every (token, remote rank) pair once each way, hidden states only).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

from omni_runtime.runtime.launcher import free_port

logger = logging.getLogger(__name__)

BACKENDS = ("naive", "agrs", "alltoallv")


def _theory(backend: str, world: int, n: int, hidden: int, top_k: int, remote_pairs: int) -> int:
    """Bytes one rank with ``n`` tokens sends, by the scheme's own algorithm (fp32 hidden, fp32 weights, int64 ids);
    every rank holding ``n`` tokens."""
    row = hidden * 4
    meta = top_k * (4 + 8)
    if backend == "naive":  # broadcast own rows to W-1 ranks; ring all-reduce of all W*n rows
        return n * (row + meta) * (world - 1) + 2 * (world - 1) * (world * n * row) // world
    if backend == "agrs":  # all-gather-v own rows to W-1 ranks; reduce-scatter-v the others' rows back
        return n * (row + meta) * (world - 1) + (world - 1) * n * row
    return 2 * remote_pairs * row  # all-to-all-v: each routed pair leaving the rank, out and back


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    import torch.distributed as dist

    from omni_runtime.parallel.all2all import attach_all2all_manager
    from omni_runtime.parallel.group_coordinator import GroupCoordinator

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    group = GroupCoordinator([list(range(world))], rank, "gloo", group_name="ep")
    comm = group.device_communicator
    rows = []
    try:
        for n in args.tokens:
            g = torch.Generator().manual_seed(1000 * rank + n)
            x = torch.randn(n, args.hidden, generator=g)
            ids = torch.rand(n, args.experts, generator=g).topk(args.top_k, dim=1).indices
            w = torch.rand(n, args.top_k, generator=g)
            per = args.experts // world
            dest = ids // per
            remote_pairs = int((dest != rank).sum())
            unique_remote = sum(int(((dest == r).any(1)).sum()) for r in range(world) if r != rank)
            times: dict[str, list[float]] = {b: [] for b in BACKENDS}
            sent: dict[str, int] = {}
            for it in range(args.iters + 1):  # iteration 0 warms up
                order = BACKENDS[it % 3:] + BACKENDS[:it % 3]
                for backend in order:
                    attach_all2all_manager(group, backend, num_experts=args.experts)
                    comm.stats.reset()
                    group.barrier()
                    t0 = time.perf_counter()
                    h, dw, _ = comm.dispatch(x, w, ids, is_sequence_parallel=True)
                    out = comm.combine(h * dw.sum(1, keepdim=True), is_sequence_parallel=True)
                    dt = torch.tensor([time.perf_counter() - t0])
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                    assert out.shape == x.shape
                    if it:
                        times[backend].append(float(dt))
                    sent[backend] = sum(v for k, v in comm.stats.bytes_by_kind.items() if k != "meta")
            for backend in BACKENDS:
                rows.append(dict(world=world, rank=rank, tokens=n, backend=backend,
                                 ms=statistics.median(times[backend]) * 1e3, sent=sent[backend],
                                 theory=_theory(backend, world, n, args.hidden, args.top_k, remote_pairs),
                                 bound=2 * unique_remote * args.hidden * 4))
    finally:
        comm.destroy_all2all_manager()
        group.destroy()
        dist.destroy_process_group()
    queue.put(rows)


def run_world(world: int, args: argparse.Namespace) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows: list[dict] = []
    try:
        for _ in procs:
            rows += queue.get(timeout=args.timeout)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 2048, 8192])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    for w in args.worlds:
        if w < 2 or args.experts % w:
            parser.error(f"--worlds {w}: must be >= 2 and divide --experts {args.experts}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"hidden {args.hidden}, {args.experts} experts, top-{args.top_k}, {args.iters} iterations (median), "
          f"cpus {os.cpu_count()}")
    print("| world | tokens/rank | backend | dispatch+combine ms | vs naive | MB sent/rank | scheme minimum MB | "
          "routing bound MB |")
    print("|---|---|---|---|---|---|---|---|")
    for world in args.worlds:
        rows = run_world(world, args)
        for n in args.tokens:
            by = {b: [r for r in rows if r["tokens"] == n and r["backend"] == b] for b in BACKENDS}
            base = statistics.mean(r["ms"] for r in by["naive"])
            for b in BACKENDS:
                rs = by[b]
                ms = statistics.mean(r["ms"] for r in rs)
                sent, theory, bound = (statistics.mean(r[k] for r in rs) / 2**20 for k in ("sent", "theory", "bound"))
                print(f"| {world} | {n} | {b} | {ms:.2f} | {ms / base:.2f} | {sent:.2f} | {theory:.2f} | {bound:.2f} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
