"""The compiled denoiser transformer against diffusers' ``torch.compile`` d transformer, one forward, same process.

Baseline: diffusers' ``FluxTransformer2DModel`` of the embedded ``small`` Flux preset with
``torch.compile(transformer)`` (what ``tools/bench_serving.py --baseline compiled`` runs). Against it, one
``--variant`` of our ``FluxTransformer`` on the same weights and inputs (one row, ``--size``, 512 text tokens):

- ``blocks``: as served with ``[stages.denoiser] compile = true`` (linears on oneDNN, each block class's ``forward``
  compiled with dynamic shapes: ``stages.compile.compile_blocks``);
- ``whole``: the whole model ``torch.compile`` d (torch's linears, static shapes);
- ``whole-freezing``: the same with inductor's ``freezing`` (weights become graph constants, GEMM weights prepacked);
- ``whole-autotune``: the same with ``mode="max-autotune"`` too (inductor's C++ GEMM template competes with MKL for
  every GEMM; the template needs frozen weights: ``torch._inductor.utils.use_cpp_gemm_template``).

One variant per run (dynamo keeps one cache per code object). ``--rounds`` rounds of one forward each, the order
flipping every round; prints the median times and the median of the per-pair ratios (variant / baseline).

Usage: ``python tools/bench_compiled_transformer.py [--variant blocks|whole|whole-freezing|whole-autotune] [--size 256x256]
[--rounds 15] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch_gain import _inputs  # noqa: E402
from serve_process import ensure_model  # noqa: E402

VARIANTS = ("blocks", "whole", "whole-freezing", "whole-autotune")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="blocks", choices=VARIANTS)
    p.add_argument("--size", default="256x256")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config
    from diffusers import FluxTransformer2DModel

    from omni_runtime.stages.compile import compile_blocks
    from omni_runtime.stages.cpu_linear import use_onednn
    from omni_runtime.stages.models.flux.transformer import FluxTransformer
    from omni_runtime.stages.weights import read_config

    model_dir = ensure_model("small", "flux") / "transformer"
    w, h = (int(v) for v in args.size.split("x"))
    x = _inputs(1, h, w, read_config(model_dir))
    hs, ehs, pooled, t, img_ids, txt_ids, guidance = x
    theirs = torch.compile(FluxTransformer2DModel.from_pretrained(model_dir).eval())
    ours = FluxTransformer.from_pretrained(model_dir)
    calls = {"diffusers": lambda: theirs(hidden_states=hs, encoder_hidden_states=ehs, pooled_projections=pooled,
                                         timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                                         return_dict=False)[0],
             args.variant: lambda: ours(*x)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        cold = {}
        for name, call in calls.items():  # diffusers compiles first, before the variant's inductor settings
            if name == "blocks":
                use_onednn(ours, torch.float32, torch.device("cpu"))
                compile_blocks([ours])
            elif name != "diffusers":
                inductor_config.freezing = args.variant in ("whole-freezing", "whole-autotune")
                ours = torch.compile(ours, mode="max-autotune" if args.variant == "whole-autotune" else None)
            t0 = time.perf_counter()
            out = call()
            cold[name] = time.perf_counter() - t0
            call()
        diff = float((calls["diffusers"]() - out).abs().max())
        for i in range(args.rounds):
            for name in list(calls) if i % 2 == 0 else list(calls)[::-1]:
                t0 = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)
    ratio = statistics.median(o / b for o, b in zip(times[args.variant], times["diffusers"], strict=True))
    print(f"small-flux transformer {args.size}, 1 row, {args.threads} threads, {args.rounds} rounds: diffusers "
          f"compiled {statistics.median(times['diffusers']) * 1e3:.1f} ms (first call {cold['diffusers']:.1f} s), "
          f"{args.variant} {statistics.median(times[args.variant]) * 1e3:.1f} ms (first call "
          f"{cold[args.variant]:.1f} s): {ratio:.3f}x; max |delta| {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
