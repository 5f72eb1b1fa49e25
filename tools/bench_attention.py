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

``--backends``: instead, the local attention backends in one process on the same inputs, alternated per iteration:
``flash_cpu`` (the CPU flash kernel, with LSE), ``sdpa`` (no LSE) and ``scores`` (materialized scores,
``parallel/attention/scores.py``) with and without the LSE; the ratio ``scores / flash_cpu`` picks
``SCORES_MAX_BYTES`` (the row where it stops being below 1). Threads: ``--threads`` (default: torch's).

    python tools/bench_attention.py --backends --seqs 256 768 1024 2048 4096 --heads 6 --head-dim 64
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


def bench_backends(seqs: list[int], heads: int, head_dim: int, iters: int, warmup: int, batch: int) -> list[str]:
    """Local backends on the same inputs, alternated per iteration; min and median per call."""
    from omni_runtime.parallel.attention.backends import attention_block
    from omni_runtime.parallel.attention.scores import SCORES_MAX_BYTES, score_bytes
    from omni_runtime.runtime.allocator import keep_freed_memory

    keep_freed_memory()  # as in a rank process: freed score matrices stay mapped
    cases = {"flash_cpu+lse": ("flash_cpu", True), "scores+lse": ("scores", True), "sdpa": ("sdpa", False),
             "scores": ("scores", False)}
    lines = [f"\nbackends: batch {batch}, heads {heads}, head_dim {head_dim}, fp32, {torch.get_num_threads()} "
             f"thread(s); auto picks scores up to {SCORES_MAX_BYTES / 2**20:.0f} MiB of scores",
             f"{'tokens':>7}{'score MiB':>10}" + "".join(f"{n + ' ms':>17}" for n in cases)
             + f"{'scores/flash (lse)':>20}{'scores/sdpa':>13}{'max|err|':>10}"]
    for seq in seqs:
        g = torch.Generator().manual_seed(seq)
        q, k, v = (torch.randn(batch, seq, heads, head_dim, generator=g) for _ in range(3))
        times: dict[str, list[float]] = {n: [] for n in cases}
        for it in range(warmup + iters):
            for name, (backend, lse) in cases.items():
                t0 = time.perf_counter()
                attention_block(q, k, v, return_lse=lse, backend=backend)
                if it >= warmup:
                    times[name].append(time.perf_counter() - t0)
        best = {n: min(t) for n, t in times.items()}
        med = {n: statistics.median(t) for n, t in times.items()}
        err = float((attention_block(q, k, v, backend="scores") - attention_block(q, k, v, backend="sdpa")).abs().max())
        lines.append(f"{seq:>7}{score_bytes(q) / 2**20:>10.1f}"
                     + "".join(f"{best[n] * 1e3:>9.2f} ({med[n] * 1e3:>5.1f})" for n in cases)
                     + f"{best['scores+lse'] / best['flash_cpu+lse']:>19.2f}x{best['scores'] / best['sdpa']:>12.2f}x"
                     + f"{err:>10.1e}")
    lines.append("each cell: min (median) ms over the iterations")
    return lines


def bench_omni(model_dir: str, size: int, steps: int, pairs: int, keep_freed: bool = False) -> list[str]:
    """One ``Omni(in_process=True)`` of ``model_dir``; generate with ``auto`` picking ``scores`` (limit 1 GiB) and
    the flash kernel (limit 0), alternated per pair, same seed; returns the latency table rows."""
    from omni_runtime.parallel.attention import scores
    from omni_runtime.runtime.config_load import config_from_dict
    from omni_runtime.runtime.omni import Omni

    if keep_freed:  # the rank processes' allocator settings (runtime.allocator), which in_process does not apply
        from omni_runtime.runtime.allocator import keep_freed_memory

        keep_freed_memory()
    limits = {"flash (limit 0)": 0, "scores (limit 1 GiB)": 2**30}
    omni = Omni(config_from_dict({"model": {"path": model_dir}}), in_process=True)
    times: dict[str, list[float]] = {n: [] for n in limits}
    try:
        for it in range(pairs + 1):  # the first pair warms up
            for name, limit in (limits.items() if it % 2 == 0 else reversed(limits.items())):
                scores.SCORES_MAX_BYTES = limit  # a benchmark-only switch of the constant auto reads
                t0 = time.perf_counter()
                omni.generate("a red cube", size=f"{size}x{size}", num_inference_steps=steps, seed=1)
                if it:
                    times[name].append(time.perf_counter() - t0)
    finally:
        omni.close()
    med = {n: statistics.median(t) for n, t in times.items()}
    ratios = [s / f for s, f in zip(times["scores (limit 1 GiB)"], times["flash (limit 0)"], strict=True)]
    return [f"\nOmni in_process, {model_dir}, {size}x{size}, {steps} steps, {pairs} pairs (alternated), "
            f"{torch.get_num_threads()} thread(s), rank allocator settings {'on' if keep_freed else 'off'}"] + [f"{n:<24}{m:>8.3f} s (median)" for n, m in med.items()] + [
        f"{'scores / flash':<24}{statistics.median(ratios):>8.2f}x (median of per-pair ratios)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--hybrid", action="store_true", help="also run world 4: hybrid 2x2, ulysses 4, ring 4")
    ap.add_argument("--backends", action="store_true",
                    help="compare the local backends (flash_cpu, sdpa, scores) in one process instead")
    ap.add_argument("--batch", type=int, default=1, help="batch size of the --backends rows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for --backends (0: torch's default)")
    ap.add_argument("--omni", metavar="MODEL_DIR", help="instead: end-to-end Omni in_process latency, scores vs "
                    "flash (e.g. a make_tiny_model.py --preset small directory)")
    ap.add_argument("--size", type=int, default=256, help="image side for --omni")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps for --omni")
    ap.add_argument("--pairs", type=int, default=3, help="alternated pairs for --omni")
    ap.add_argument("--keep-freed", action="store_true", help="--omni with the rank processes' allocator settings")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.omni:
        print("\n".join(bench_omni(args.omni, args.size, args.steps, args.pairs, args.keep_freed)))
        return
    if args.backends:
        if args.threads:
            torch.set_num_threads(args.threads)
        print("\n".join(bench_backends(args.seqs, args.heads, args.head_dim, args.iters, args.warmup, args.batch)))
        return
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
