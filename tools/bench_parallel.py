"""Benchmarks of the parallel strategies inside one stage, each against its baseline in the same run.

HSDP section (:func:`bench_hsdp`), 2 ranks on gloo, a transformer of >= 200 MB (``make_big_transformer``):

- load: per-rank resident parameter bytes and peak RSS growth while loading (and reading every weight once),
  hsdp_shard 2 (each rank reads its rows) vs 1 (every rank loads the whole model); each in fresh processes;
- step latency: one transformer forward (one denoising step), hsdp_shard 2 vs unsharded, in the same processes
  with the same threads, phases alternated, median of per-pair ratios; plus hsdp_shard 2 with forward prefetch
  (each block starts the next block's all-gather) to see whether gloo overlaps it with compute;
- bytes all-gathered per step (counted at ``torch.distributed.all_gather_single``, FSDP2's collective) against the
  model size.

Usage: ``python tools/bench_parallel.py hsdp [--tokens 256] [--pairs 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _touch(model: Any) -> None:
    """Read every local parameter byte (the unsharded loader's tensors are views of the mmapped file)."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        (p.to_local() if isinstance(p, DTensor) else p).sum()


def _flux_inputs(cfg: Any, tokens: int, text: int = 16) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    side = int(tokens ** 0.5)
    ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // side, torch.arange(tokens) % side], 1)
    return dict(hidden_states=torch.randn(1, tokens, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), img_ids=ids.float(), txt_ids=torch.zeros(text, 3),
                guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None)


def _hsdp_rank(rank: int, world: int, port: int, path: str, out: str, phase: str, tokens: int, pairs: int,
               threads: int) -> None:
    import torch
    import torch.distributed as dist

    from omni_runtime.parallel.hsdp import HSDPInferenceConfig, apply_hsdp_to_model, local_parameter_bytes
    from omni_runtime.stages.models.flux import FluxTransformer

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = HSDPInferenceConfig(hsdp_shard_size=world)
    apply_hsdp_to_model(torch.nn.Linear(4, 4, device="meta"), cfg)  # one-off imports + mesh: process baseline
    result: dict[str, Any] = {}
    if phase in ("load1", "load2"):
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
        before = _status_bytes("VmRSS")
        t0 = time.perf_counter()
        model = FluxTransformer.from_pretrained(path, hsdp=cfg if phase == "load2" else None)
        _touch(model)
        result = {"load_s": time.perf_counter() - t0, "peak_growth": _status_bytes("VmHWM") - before,
                  "local_bytes": local_parameter_bytes(model)}
    else:
        full = FluxTransformer.from_pretrained(path)
        _touch(full)
        sharded = FluxTransformer.from_pretrained(path, hsdp=cfg)
        units = [*sharded.transformer_blocks, *sharded.single_transformer_blocks]
        inputs = _flux_inputs(full.config, tokens)

        def set_prefetch(on: bool) -> None:
            for i, unit in enumerate(units[:-1]):
                unit.set_modules_to_forward_prefetch([units[i + 1]] if on else [])

        gathered = [0]
        original = dist.all_gather_single

        def counting(output, input, *args, **kwargs):  # noqa: A002 (the collective's own parameter name)
            gathered[0] += output.numel() * output.element_size()
            return original(output, input, *args, **kwargs)

        def step(model: Any) -> float:
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                model(**inputs)
            return time.perf_counter() - t0

        step(full), step(sharded)  # warm-up
        dist.all_gather_single = counting
        step(sharded)
        dist.all_gather_single = original
        times: dict[str, list[float]] = {"unsharded": [], "hsdp2": [], "hsdp2_prefetch": []}
        for i in range(pairs):  # alternate the phases; rotate which goes first
            order = ["unsharded", "hsdp2", "hsdp2_prefetch"]
            order = order[i % 3:] + order[:i % 3]
            for name in order:
                set_prefetch(name == "hsdp2_prefetch")
                times[name].append(step(full if name == "unsharded" else sharded))
        result = {"times": times, "gathered_per_step": gathered[0],
                  "model_bytes": sum(p.numel() * p.element_size() for p in full.parameters())}
    Path(out, f"{phase}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run(phase: str, world: int, path: str, out: str, tokens: int, pairs: int, threads: int,
         timeout: float = 600) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_hsdp_rank, args=(r, world, port, path, out, phase, tokens, pairs, threads))
             for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"phase {phase} failed: exit codes {[p.exitcode for p in procs]}")
    return [json.loads(Path(out, f"{phase}-rank{r}.json").read_text()) for r in range(world)]


def bench_hsdp(tokens: int = 256, pairs: int = 3, threads: int = 1, layers: int = 2, single_layers: int = 4
               ) -> dict[str, Any]:
    """HSDP on 2 gloo ranks vs the unsharded model; prints a table and returns the numbers."""
    from omni_runtime.stages.models.tiny import make_big_transformer

    world = 2
    with tempfile.TemporaryDirectory(prefix="bench-hsdp-") as tmp:
        path = str(Path(tmp) / "transformer")
        weights = make_big_transformer(path, num_layers=layers, num_single_layers=single_layers)
        load1 = _run("load1", world, path, tmp, tokens, pairs, threads)
        load2 = _run("load2", world, path, tmp, tokens, pairs, threads)
        steps = _run("step", world, path, tmp, tokens, pairs, threads)
    mb = 2 ** 20
    print(f"HSDP, {world} gloo ranks x {threads} thread(s), transformer of {weights / mb:.0f} MB fp32, "
          f"{tokens} image tokens + 16 text tokens, {pairs} alternated rounds")
    print(f"{'':28s}{'hsdp_shard 1':>14s}{'hsdp_shard 2':>14s}{'ratio':>8s}")
    loc1, loc2 = max(r["local_bytes"] for r in load1), max(r["local_bytes"] for r in load2)
    pk1, pk2 = max(r["peak_growth"] for r in load1), max(r["peak_growth"] for r in load2)
    print(f"{'param bytes per rank (MB)':28s}{loc1 / mb:14.1f}{loc2 / mb:14.1f}{loc2 / loc1:8.2f}")
    print(f"{'peak RSS growth, load (MB)':28s}{pk1 / mb:14.1f}{pk2 / mb:14.1f}{pk2 / pk1:8.2f}")
    t = steps[0]["times"]
    ratios = {name: statistics.median(a / b for a, b in zip(t[name], t["unsharded"], strict=True))
              for name in ("hsdp2", "hsdp2_prefetch")}
    med = {name: statistics.median(v) for name, v in t.items()}
    print(f"{'step latency (s)':28s}{med['unsharded']:14.3f}{med['hsdp2']:14.3f}{ratios['hsdp2']:8.2f}")
    print(f"{'  with forward prefetch':28s}{'':14s}{med['hsdp2_prefetch']:14.3f}{ratios['hsdp2_prefetch']:8.2f}")
    gathered = steps[0]["gathered_per_step"]
    print(f"all-gathered per step and rank: {gathered / mb:.1f} MB = {gathered / steps[0]['model_bytes']:.2f} x "
          f"the model ({(1 - 1 / world) * gathered / mb:.1f} MB received from the peer)")
    return {"weights": weights, "local": (loc1, loc2), "peak_growth": (pk1, pk2), "latency": med,
            "ratios": ratios, "gathered": gathered}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["hsdp"], help="which benchmark to run")
    parser.add_argument("--tokens", type=int, default=256, help="image tokens per step (a square)")
    parser.add_argument("--pairs", type=int, default=3, help="alternated rounds of the step latency phases")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch threads per rank")
    parser.add_argument("--layers", type=int, default=2, help="double-stream blocks (2 -> ~216 MB with 4 single)")
    parser.add_argument("--single-layers", type=int, default=4, help="single-stream blocks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.section == "hsdp":
        bench_hsdp(args.tokens, args.pairs, args.threads, args.layers, args.single_layers)


if __name__ == "__main__":
    main()
