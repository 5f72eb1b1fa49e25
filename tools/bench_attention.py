"""Benchmark sequence-parallel attention on gloo: time per call and bytes sent per rank.

Compares, in one run and on the same shapes (batch 1, fp32):

- ``single``: unsharded ``scaled_dot_product_attention`` in one process with every core (the baseline);
- ``none``: our ``sp_attention`` with no mesh (the same call through our wrapper);
- ``ulysses`` / ``ring`` (world ``--world``) and ``hybrid`` (ulysses 2 × ring 2, world 4, when
  ``--hybrid`` is on): our strategies, each rank with ``cores / world`` threads;
- ``diffusers-ulysses`` / ``diffusers-ring``: diffusers' context parallelism
  (``ContextParallelConfig``, native attention backend) called through ``dispatch_attention_fn``
  with a ``ParallelConfig`` set up on a CPU ``DeviceMesh`` (``enable_parallelism`` itself cannot run
  on a CPU-only machine); a case that cannot run is reported with its exception.

Within each world the strategies are interleaved per iteration, so machine noise hits all alike;
the minimum and the median over ``--iters`` are reported (ratios use the minimum). Bytes sent are counted from the tensors our strategies hand
to the collectives and compared with each strategy's theoretical minimum.

    python tools/bench_attention.py --seqs 4096 8192 --heads 8 --head-dim 64 --world 2 --hybrid
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from omni_runtime.runtime.launcher import free_port

logger = logging.getLogger("bench_attention")


def theoretical_bytes(strategy: str, s_local: int, heads: int, head_dim: int, elsize: int, u: int, r: int) -> int:
    """Least bytes a rank must send per call: Ulysses moves q, k, v and out once (all but its own
    1/U); Ring must pass its K and V block to each of the R-1 other ranks."""
    vol = s_local * heads * head_dim * elsize
    ulysses = 4 * vol * (u - 1) // u
    ring = 2 * vol * (r - 1)
    return {"ulysses": ulysses, "ring": ring, "hybrid": ulysses + ring}.get(strategy, 0)


def _diffusers_config(kind: str, world: int, rank: int):
    from diffusers import ContextParallelConfig, ParallelConfig

    cp = ContextParallelConfig(ring_degree=world if kind == "ring" else None,
                               ulysses_degree=world if kind == "ulysses" else None)
    pc = ParallelConfig(context_parallel_config=cp)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    pc.setup(rank, world, torch.device("cpu"), mesh=mesh)
    return pc


def _worker(rank: int, world: int, port: int, outdir: str, seqs: list[int], heads: int, head_dim: int,
            iters: int, warmup: int, strategies: list[str], diffusers_kinds: list[str], baseline: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    cores = os.cpu_count() or 1
    threads = max(1, cores // world)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    from omni_runtime.parallel.attention import SPMesh, sp_attention
    from omni_runtime.parallel.group_coordinator import GroupCoordinator

    everyone = GroupCoordinator([list(range(world))], rank, "gloo", group_name="bench_sp")
    # hybrid: ulysses groups contiguous, ring groups strided, as in parallel.state
    u_groups = [[0, 1], [2, 3]] if world == 4 else [list(range(world))]
    r_groups = [[0, 2], [1, 3]] if world == 4 else [list(range(world))]
    hyb_u = GroupCoordinator(u_groups, rank, "gloo", group_name="bench_u")
    hyb_r = GroupCoordinator(r_groups, rank, "gloo", group_name="bench_r")
    one = GroupCoordinator.single(rank, "bench_one")
    meshes = {
        "ulysses": SPMesh(sp=everyone, ulysses=everyone, ring=one),
        "ring": SPMesh(sp=everyone, ulysses=one, ring=everyone),
        "hybrid": SPMesh(sp=everyone, ulysses=hyb_u, ring=hyb_r),
        "none": SPMesh(sp=one, ulysses=one, ring=one),
    }
    dconfigs: dict[str, Any] = {}
    derrors: dict[str, str] = {}
    for kind in diffusers_kinds:
        try:
            dconfigs[kind] = _diffusers_config(kind, world, rank)
        except Exception as e:  # reported, not hidden
            derrors[kind] = f"{type(e).__name__}: {e}"

    results: dict[str, Any] = {"world": world, "threads": threads, "seqs": {}}
    # bytes sent are counted by each group's communicator (the one communication seam)
    counters = [c.device_communicator.stats for c in (everyone, hyb_u, hyb_r) if c.device_communicator is not None]
    for seq in seqs:
        g = torch.Generator().manual_seed(seq)
        q, k, v = (torch.randn(1, seq, heads, head_dim, generator=g) for _ in range(3))
        s_local = seq // world
        sl = slice(rank * s_local, (rank + 1) * s_local)
        lq, lk, lv = (t[:, sl].contiguous() for t in (q, k, v))
        times: dict[str, list[float]] = {}
        sent: dict[str, int] = {}
        outs: dict[str, torch.Tensor] = {}
        errors = dict(derrors)

        for it in range(warmup + iters):
            cases: list[tuple[str, Any]] = []
            for strat in strategies:
                cases.append((strat, partial(sp_attention, lq, lk, lv, mesh=meshes[strat])))
            for kind, pc in dconfigs.items():
                if f"diffusers-{kind}" in errors:
                    continue
                cases.append((f"diffusers-{kind}", partial(dispatch_attention_fn, lq, lk, lv,
                                                           backend=AttentionBackendName.NATIVE, parallel_config=pc)))
            if baseline:
                cases.append(("single", None))
                cases.append(("none", None))
            for name, fn in cases:
                if name in ("single", "none"):
                    # one process with every core; the other ranks wait at the barrier
                    dist.barrier()
                    if rank == 0:
                        torch.set_num_threads(cores)
                        t0 = time.perf_counter()
                        if name == "single":
                            torch.nn.functional.scaled_dot_product_attention(
                                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                        else:
                            sp_attention(q, k, v, mesh=meshes["none"])
                        times.setdefault(name, []).append(time.perf_counter() - t0)
                        sent[name] = 0
                        torch.set_num_threads(threads)
                    dist.barrier()
                    continue
                try:
                    dist.barrier()
                    for c in counters:
                        c.reset()
                    t0 = time.perf_counter()
                    outs[name] = fn()
                    times.setdefault(name, []).append(time.perf_counter() - t0)
                    sent[name] = sum(c.bytes_sent for c in counters)
                    dist.barrier()
                except Exception as e:
                    errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
                    dist.barrier()
            if it < warmup:
                times.clear()
        ref = torch.nn.functional.scaled_dot_product_attention(
            lq.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        maxerr = {name: float((o - ref).abs().max()) for name, o in outs.items()}
        results["seqs"][str(seq)] = {
            "median_s": {n: statistics.median(t) for n, t in times.items()},
            "min_s": {n: min(t) for n, t in times.items()},
            "bytes_sent": sent, "max_abs_err": maxerr, "errors": errors, "s_local": s_local,
        }
    (Path(outdir) / f"rank{rank}.json").write_bytes(msgspec.json.encode(results))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, **kw: Any) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-attn-") as outdir:
        port = free_port()
        args = (world, port, outdir, kw["seqs"], kw["heads"], kw["head_dim"], kw["iters"], kw["warmup"],
                kw["strategies"], kw["diffusers_kinds"], kw["baseline"])
        mp.start_processes(_worker, args=args, nprocs=world, start_method="spawn", join=True)
        return [msgspec.json.decode((Path(outdir) / f"rank{r}.json").read_bytes()) for r in range(world)]


def _strategy_degrees(name: str, world: int) -> tuple[int, int]:
    return {"ulysses": (world, 1), "ring": (1, world), "hybrid": (2, 2)}.get(name, (1, 1))


def report(per_rank: list[dict], heads: int, head_dim: int) -> list[str]:
    world = per_rank[0]["world"]
    lines = []
    for seq, res in per_rank[0]["seqs"].items():
        # a call takes as long as its slowest rank; ratios use the minimum over iterations (least
        # disturbed by other load on a shared machine), the median is shown next to it
        med = {n: max(r["seqs"][seq]["median_s"].get(n, 0.0) for r in per_rank) for n in res["median_s"]}
        best = {n: max(r["seqs"][seq]["min_s"].get(n, 0.0) for r in per_rank) for n in res["min_s"]}
        base = best.get("single")
        s_local = res["s_local"]
        lines.append(f"\nworld {world} ({per_rank[0]['threads']} thread(s)/rank), seq {seq}, heads {heads}, "
                     f"head_dim {head_dim}, fp32")
        lines.append(f"{'strategy':<20}{'min s':>8}{'median s':>10}{'vs single':>11}{'vs diffusers':>14}"
                     f"{'bytes sent/rank':>17}{'theoretical min':>17}{'ratio':>8}{'max|err|':>11}")
        for name, t in best.items():
            strat = name.replace("diffusers-", "")
            u, r = _strategy_degrees(strat, world)
            theo = theoretical_bytes(strat, s_local, heads, head_dim, 4, u, r)
            peer = best.get(f"diffusers-{name}")
            sent = max(rr["seqs"][seq]["bytes_sent"].get(name, 0) for rr in per_rank)
            measured = "n/a (theirs)" if name.startswith("diffusers") else f"{sent:,}"
            ratio = f"{sent / theo:.4f}" if theo and not name.startswith("diffusers") else "-"
            err = max(rr["seqs"][seq]["max_abs_err"].get(name, 0.0) for rr in per_rank)
            lines.append(f"{name:<20}{t:>8.3f}{med[name]:>10.3f}{(t / base if base else float('nan')):>10.2f}x"
                         f"{(f'{t / peer:.2f}x' if peer else '-'):>14}{measured:>17}{theo:>17,}{ratio:>8}"
                         f"{(f'{err:.1e}' if name not in ('single', 'none') else '-'):>11}")
        for name, err in res["errors"].items():
            lines.append(f"  could not run {name}: {err}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--hybrid", action="store_true", help="also run world 4: hybrid 2x2, ulysses 4, ring 4")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    common = dict(seqs=args.seqs, heads=args.heads, head_dim=args.head_dim, iters=args.iters, warmup=args.warmup)
    out = [f"bench_attention: seqs {args.seqs}, iters {args.iters} (+{args.warmup} warmup), median per call; "
           f"{os.cpu_count()} cores"]
    out += report(run_world(args.world, strategies=["ulysses", "ring"], diffusers_kinds=["ulysses", "ring"],
                           baseline=True, **common), args.heads, args.head_dim)
    if args.hybrid:
        out += report(run_world(4, strategies=["hybrid", "ulysses", "ring"], diffusers_kinds=["ulysses", "ring"],
                                baseline=True, **common), args.heads, args.head_dim)
    print("\n".join(out))


if __name__ == "__main__":
    main()
