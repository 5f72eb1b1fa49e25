"""What batching rows buys the denoiser on this host: one forward of K rows against K forwards of one row.

Step-level batching raises throughput only where a forward of K rows costs less than K forwards of one (bigger
GEMMs that use the device better). This times the served denoiser's transformer (the embedded ``small`` Flux
preset, its linears as served: ``cpu_linear`` onednn; ``--compile``: its blocks compiled as
``[stages.denoiser] compile = true`` does) on the same inputs at 1 row and at ``--rows`` rows, the two alternating
(the order flips every round), and prints the median of the per-pair ratios of the per-row time (K rows / K) / (1
row): 1.0 means batching gains nothing, 0.5 that a row costs half as much in a batch.

Usage: ``python tools/bench_batch_gain.py [--size 256x256] [--rows 4] [--rounds 15] [--compile] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import ensure_model  # noqa: E402

TEXT_TOKENS = 512  # FluxPipeline's max_sequence_length: the text tokens every served Flux row attends to


def _inputs(rows: int, height: int, width: int, config: dict) -> tuple[torch.Tensor, ...]:
    from omni_runtime.stages.latents import image_seq_len

    g = torch.Generator().manual_seed(0)
    tokens, cols = image_seq_len(height, width, 8), width // 16
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(tokens) // cols, torch.arange(tokens) % cols
    return (torch.randn(rows, tokens, config["in_channels"], generator=g),
            torch.randn(rows, TEXT_TOKENS, config["joint_attention_dim"], generator=g),
            torch.randn(rows, config["pooled_projection_dim"], generator=g), torch.full((rows,), 0.5), img_ids,
            torch.zeros(TEXT_TOKENS, 3), torch.full((rows,), 3.5))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="256x256")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--compile", action="store_true", help="the blocks compiled (stages.compile.compile_blocks)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from omni_runtime.stages.compile import compile_blocks
    from omni_runtime.stages.cpu_linear import use_onednn
    from omni_runtime.stages.models.flux.transformer import FluxTransformer
    from omni_runtime.stages.weights import read_config

    model_dir = ensure_model("small", "flux") / "transformer"
    model = FluxTransformer.from_pretrained(model_dir)
    use_onednn(model, torch.float32, torch.device("cpu"))
    if args.compile:
        compile_blocks([model])
    w, h = (int(v) for v in args.size.split("x"))
    config = read_config(model_dir)
    one, many = _inputs(1, h, w, config), _inputs(args.rows, h, w, config)
    times: dict[int, list[float]] = {1: [], args.rows: []}
    with torch.inference_mode():
        for x in (one, many, one, many):  # warm-up (with --compile: the graphs of 1 row and of several)
            model(*x)
        for i in range(args.rounds):
            for rows, x in ((1, one), (args.rows, many)) if i % 2 == 0 else ((args.rows, many), (1, one)):
                t0 = time.perf_counter()
                model(*x)
                times[rows].append(time.perf_counter() - t0)
    ratio = statistics.median(k / (args.rows * o) for k, o in zip(times[args.rows], times[1], strict=True))
    print(f"small-flux denoiser {args.size}, {'compiled' if args.compile else 'eager'}, {args.threads} threads, "
          f"{args.rounds} rounds: 1 row {statistics.median(times[1]) * 1e3:.1f} ms, {args.rows} rows "
          f"{statistics.median(times[args.rows]) * 1e3:.1f} ms; per-row time {args.rows} rows / 1 row = {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
