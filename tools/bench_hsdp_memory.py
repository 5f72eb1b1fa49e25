"""Memory of the denoiser ranks with HSDP in steady state, measured from outside (/proc): hsdp_shard 2 vs 1.

A FLUX-layout transformer of >= 200 MB fp32 (``stages.models.flux.tiny.make_big_transformer``) in a tiny pipeline
(its text encoders and VAE are the ``tiny`` preset's); for each layout a fresh ``Omni`` (rank processes, the
launcher's allocator settings) loads it, then serves ``--requests`` requests one after another. Each denoiser rank
process (found by its process title, ``omni-runtime: denoiser[0] rank r/w``) is read from
``/proc/<pid>/status`` (VmRSS, VmHWM) and ``/proc/<pid>/smaps`` (resident bytes of the ``[heap]`` mapping, of
other anonymous mappings, of file mappings) after load and after the requests. Layouts alternate
(1, 2, 2, 1, ...: ``--rounds``), so load from other jobs hits both alike; the request latency is the median.

The target (issue 29): after requests each sharded rank's RSS <= the unsharded rank's - 0.4 x the sharded weight
bytes.

    python tools/bench_hsdp_memory.py --requests 3 --size 256 --steps 2 --rounds 1

``--latency``: instead, the price of the release: 2 gloo ranks (the launcher's allocator settings) hold the
transformer sharded twice, with ``release_after_forward`` on and off, and time forwards of ``--tokens`` image tokens,
phases alternated (``--pairs`` x (on x3, off x3), the first forward of each phase left out); the step latency
ratio on / off, and the RSS after each phase.

    python tools/bench_hsdp_memory.py --latency --tokens 1024 --pairs 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import psutil

MB = 1e6


def rank_memory(pid: int) -> dict[str, float]:
    """VmRSS / VmHWM and the resident bytes of the heap, other anonymous and file mappings (MB)."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024 / MB
    heap = anon = files = 0
    kind = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else ""
            kind = "heap" if name == "[heap]" else ("file" if name.startswith("/") else "anon")
        elif head and head[0] == "Rss:":
            kb = int(head[1])
            if kind == "heap":
                heap += kb
            elif kind == "file":
                files += kb
            else:
                anon += kb
    out.update(heap=heap * 1024 / MB, anon=anon * 1024 / MB, file=files * 1024 / MB)
    return out


def denoiser_ranks() -> dict[str, int]:
    """``{title: pid}`` of this process's denoiser rank descendants."""
    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("omni-runtime: denoiser"):
            found[cmd.removeprefix("omni-runtime: ")] = p.pid
    return found


def run_layout(model_dir: str, shard: int, requests: int, size: int, steps: int) -> dict:
    from omni_runtime.runtime.config_load import config_from_dict
    from omni_runtime.runtime.omni import Omni

    cfg = config_from_dict({"model": {"path": model_dir},
                            "stages": {"denoiser": {"parallel": {"hsdp_shard": shard}}}})
    omni = Omni(cfg)
    try:
        ranks = denoiser_ranks()
        assert len(ranks) == shard, ranks
        loaded = {t: rank_memory(pid) for t, pid in ranks.items()}
        lat = []
        for i in range(requests):
            t0 = time.perf_counter()
            omni.generate("a red cube", size=f"{size}x{size}", num_inference_steps=steps, seed=i)
            lat.append(time.perf_counter() - t0)
        time.sleep(0.5)  # the ranks' idle work (if any) after the last reply
        served = {t: rank_memory(pid) for t, pid in ranks.items()}
    finally:
        omni.close()
    return {"loaded": loaded, "served": served, "latency": lat}


def _latency_rank(rank: int, world: int, port: int, path: str, tokens: int, pairs: int, out: str) -> None:
    import os

    import msgspec
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from omni_runtime.parallel.hsdp import HSDPInferenceConfig
    from omni_runtime.runtime.allocator import keep_freed_memory
    from omni_runtime.stages.models.flux.transformer import FluxTransformer

    keep_freed_memory()
    models = {on: FluxTransformer.from_pretrained(path, hsdp=HSDPInferenceConfig(hsdp_shard_size=world,
                                                                                   release_after_forward=on))
              for on in (True, False)}
    cfg = models[True].config
    g = torch.Generator().manual_seed(0)
    side = int(tokens ** 0.5)
    inputs = dict(hidden_states=torch.randn(1, side * side, cfg.in_channels, generator=g),
                  encoder_hidden_states=torch.randn(1, 64, cfg.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                  timestep=torch.tensor([0.7]), txt_ids=torch.zeros(64, 3), guidance=torch.tensor([3.5]),
                  img_ids=torch.stack([torch.zeros(side * side), torch.arange(side * side) // side,
                                       torch.arange(side * side) % side], 1))
    times: dict[str, list[float]] = {"on": [], "off": []}
    rss: dict[str, list[float]] = {"on": [], "off": []}
    with torch.no_grad():
        for _ in range(pairs):
            for on in (True, False):
                name = "on" if on else "off"
                for i in range(3):
                    dist.barrier()
                    t0 = time.perf_counter()
                    models[on](**inputs)
                    if i:
                        times[name].append(time.perf_counter() - t0)
                rss[name].append(rank_memory(os.getpid())["VmRSS"])
    Path(out, f"rank{rank}.json").write_bytes(msgspec.json.encode({"times": times, "rss": rss}))
    dist.destroy_process_group()


def bench_latency(tokens: int, pairs: int) -> None:
    import msgspec
    import torch.multiprocessing as mp

    from omni_runtime.runtime.launcher import free_port
    from omni_runtime.stages.models.flux.tiny import make_big_transformer

    with tempfile.TemporaryDirectory(prefix="bench-hsdp-lat-") as tmp:
        weights = make_big_transformer(Path(tmp) / "t")
        mp.start_processes(_latency_rank, args=(2, free_port(), str(Path(tmp) / "t"), tokens, pairs, tmp),
                           nprocs=2, start_method="spawn", join=True)
        ranks = [msgspec.json.decode(Path(tmp, f"rank{r}.json").read_bytes()) for r in range(2)]
    step = {n: [max(r["times"][n][i] for r in ranks) for i in range(len(ranks[0]["times"][n]))] for n in ("on", "off")}
    med = {n: statistics.median(t) for n, t in step.items()}
    print(f"HSDP release latency: transformer {weights / MB:.0f} MB, 2 gloo ranks x 1 thread, {tokens} image tokens, "
          f"{pairs} pairs of phases (3 forwards each, first left out)")
    for n in ("on", "off"):
        print(f"release_after_forward {n:<4} step {med[n]:.3f} s (median), RSS after phase "
              f"{max(max(r['rss'][n]) for r in ranks):.0f} MB (worst rank)")
    print(f"ratio on / off: {med['on'] / med['off']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the two layouts (1: 1, 2, 2, 1)")
    ap.add_argument("--latency", action="store_true", help="instead: step latency with the release on vs off")
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens per forward (--latency)")
    ap.add_argument("--pairs", type=int, default=3, help="alternated phase pairs (--latency)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.latency:
        bench_latency(args.tokens, args.pairs)
        return
    from omni_runtime.stages.models.flux.tiny import make_big_transformer, make_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-hsdp-mem-") as tmp:
        make_tiny_model(tmp, preset="tiny")
        weights = make_big_transformer(Path(tmp) / "transformer")
        order = [1, 2, 2, 1] * args.rounds
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for shard in order:
            runs[shard].append(run_layout(tmp, shard, args.requests, args.size, args.steps))
    cols = ("VmRSS", "VmHWM", "heap", "anon", "file")
    print(f"HSDP memory: transformer {weights / MB:.0f} MB fp32 (sharded: {weights / 2 / MB:.0f} MB per rank), "
          f"{args.requests} requests {args.size}x{args.size} x {args.steps} steps, layouts {order}")
    print(f"{'layout / rank':<20}{'when':<8}" + "".join(f"{c + ' MB':>11}" for c in cols))
    worst: dict[int, float] = {}
    for shard, rs in runs.items():
        for r in rs:
            for when in ("loaded", "served"):
                for title, m in sorted(r[when].items()):
                    label = f"hsdp{shard} " + " ".join(title.split()[1:])
                    print(f"{label:<20}{when:<8}" + "".join(f"{m[c]:>11.0f}" for c in cols))
                    if when == "served":
                        worst[shard] = max(worst.get(shard, 0.0), m["VmRSS"])
    unsharded = min(m["VmRSS"] for r in runs[1] for m in r["served"].values())
    target = unsharded - 0.4 * (weights / 2) / MB
    print(f"after requests: worst sharded rank {worst[2]:.0f} MB, unsharded {unsharded:.0f} MB, target <= "
          f"{target:.0f} MB (unsharded - 0.4 x {weights / 2 / MB:.0f} MB): {'met' if worst[2] <= target else 'NOT met'}")
    for shard, rs in runs.items():
        lat = [x for r in rs for x in r["latency"][1:]] or [x for r in rs for x in r["latency"]]
        print(f"hsdp_shard {shard}: request latency median {statistics.median(lat):.3f} s (first request of each "
              "run left out)")


if __name__ == "__main__":
    main()
