"""Does ``torch.compile`` of the VAE decoder pay? The VAE stage's decode, eager (as served) against compiled.

Two ``VaeDecoderStage`` s of the same checkpoint (the embedded ``small`` Flux preset by default) in this process: the
served one (eager; on CPU float32 its convolutions run channels-last, ``stages/vae.py``) and the same with its
``decoder`` module ``torch.compile`` d (``--mode dynamic``: ``dynamic=True``, one graph for every size as a serving
stage would need; ``static``: a graph per size). The first compiled decode at each size is the compile, reported and
excluded; then ``--rounds`` rounds of one decode each, the two alternating (the order flips every round), at each
``--sizes`` size. Prints the median decode times and the median of the per-pair ratios (compiled / eager; below 1:
compiling pays). One mode per run: dynamo keeps one cache per code object, so two compiled variants in one process
would share graphs.

Usage: ``python tools/bench_vae_compile.py [--preset small] [--sizes 256x256,512x512,1024x1024] [--mode dynamic]
[--batch 1] [--rounds 11] [--threads 2]``. Absolute times depend on the machine; the ratios are the result.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--sizes", default="256x256,512x512,1024x1024")
    p.add_argument("--mode", default="dynamic", choices=["dynamic", "static"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from omni_runtime.stages.latents import image_seq_len
    from omni_runtime.stages.vae import VaeDecoderStage

    model = ensure_model(args.preset, "flux")
    eager = VaeDecoderStage.from_pretrained(model)
    compiled = VaeDecoderStage.from_pretrained(model)
    compiled.vae.decoder.forward = torch.compile(compiled.vae.decoder.forward, dynamic=args.mode == "dynamic")
    print(f"{model.name} VAE, batch {args.batch}, {args.threads} threads, torch.compile {args.mode}, "
          f"{args.rounds} alternating rounds per size")
    print("| size | compile (first call) | eager decode (served) | compiled decode | compiled / eager |")
    print("|---|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        lat = torch.randn(args.batch, image_seq_len(h, w, eager.vae_scale_factor), 4 * eager.latent_channels,
                          generator=g)
        t0 = time.perf_counter()
        compiled.decode(lat, h, w)
        cold = time.perf_counter() - t0
        eager.decode(lat, h, w)
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for i in range(args.rounds):
            for name in ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager"):
                stage = eager if name == "eager" else compiled
                t0 = time.perf_counter()
                stage.decode(lat, h, w)
                times[name].append(time.perf_counter() - t0)
        ratio = statistics.median(c / e for c, e in zip(times["compiled"], times["eager"], strict=True))
        print(f"| {size} | {cold:.1f} s | {statistics.median(times['eager']) * 1e3:.1f} ms | "
              f"{statistics.median(times['compiled']) * 1e3:.1f} ms | {ratio:.3f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
