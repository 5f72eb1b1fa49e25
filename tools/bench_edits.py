"""Image-edit benchmark: ``POST /v1/images/edits`` through ``serve`` against diffusers' ``FluxKontextPipeline`` called
in-process, same checkpoint (the embedded ``small`` FLUX.1-Kontext preset), same machine, same run.

(a) latency of one edit through serve (HTTP multipart + text encoder, VAE encode, denoiser, VAE decode stages) vs
    one pipeline call (``image=..., _auto_resize=False, max_area=W*H``, what the served result equals);
(b) throughput with ``--clients`` concurrent clients vs diffusers editing one image at a time.

Phases alternate (diffusers, serve, diffusers, ...) with a pause before each, and the table reports the median of the
per-pair ratios, so a noisy neighbour hits both sides alike.

Usage: ``python tools/bench_edits.py [--preset small] [--size 256x256] [--steps 8] [--repeats 5] [--rounds 2]
[--clients 4]``. The recorded run (docs/BENCHMARKS.md) is ``--size 128x128 --steps 4 --repeats 3 --rounds 1``.
Prints a table; ratios matter, absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import ROOT, ServeProcess, ensure_model  # noqa: E402

logger = logging.getLogger(__name__)

PAUSE_S = 1.0
PROMPT = "make the sky purple"


def _input_png(width: int, height: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--size", default="256x256")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="alternating (diffusers, serve) latency pairs")
    p.add_argument("--rounds", type=int, default=2, help="alternating throughput pairs")
    p.add_argument("--clients", type=int, default=4, help="concurrent serve clients in the throughput phases")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    from diffusers import FluxKontextPipeline
    from PIL import Image

    width, height = (int(v) for v in args.size.split("x"))
    model = ensure_model(args.preset, "flux-kontext")
    image = _input_png(width, height)
    pipe = FluxKontextPipeline.from_pretrained(str(model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def diffusers_edit(seed: int) -> float:
        t0 = time.perf_counter()
        pipe(image=Image.open(io.BytesIO(image)).convert("RGB"), prompt=PROMPT, height=height, width=width,
             max_area=width * height, _auto_resize=False, num_inference_steps=args.steps,
             generator=torch.Generator("cpu").manual_seed(seed))
        return time.perf_counter() - t0

    text = (ROOT / "configs" / "flux_kontext.toml").read_text().replace('path = "../models/tiny-flux-kontext"',
                                                                          f'path = "{model}"')
    server = ServeProcess(text, name="bench-edits")
    try:
        def serve_edit(seed: int) -> float:
            t0 = time.perf_counter()
            r = server.client().post("/v1/images/edits", files=[("image", ("in.png", image, "image/png"))], data={
                "prompt": PROMPT, "size": args.size, "seed": str(seed), "num_inference_steps": str(args.steps)})
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:2000]}")
            return time.perf_counter() - t0

        serve_edit(0), diffusers_edit(0)  # warm-up: first-call costs on both sides
        pairs = []
        for i in range(args.repeats):
            time.sleep(PAUSE_S)
            d = diffusers_edit(i)
            time.sleep(PAUSE_S)
            pairs.append((d, serve_edit(i)))
        total = 2 * args.clients
        through = []
        for r in range(args.rounds):
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            for i in range(total):
                diffusers_edit(100 + i)
            d_rate = total / (time.perf_counter() - t0)
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.clients) as ex:
                list(ex.map(serve_edit, range(100 + r * total, 100 + (r + 1) * total)))
            through.append((d_rate, total / (time.perf_counter() - t0)))
    finally:
        server.stop()
    d_med, s_med = statistics.median(d for d, _ in pairs), statistics.median(s for _, s in pairs)
    ratio = statistics.median(s / d for d, s in pairs)
    print(f"\n{args.preset}-flux-kontext, {args.size} (input {args.size}), {args.steps} steps, float32 CPU")
    print("| measure | diffusers FluxKontextPipeline | serve /v1/images/edits | serve / diffusers |")
    print("|---|---|---|---|")
    print(f"| latency of one edit (median of {args.repeats} pairs) | {d_med:.2f} s | {s_med:.2f} s | {ratio:.2f}x |")
    t_ratio = statistics.median(s / d for d, s in through)
    print(f"| throughput, {args.clients} clients vs one at a time ({args.rounds} rounds of {total} edits) | "
          f"{statistics.median(d for d, _ in through):.3f} img/s | {statistics.median(s for _, s in through):.3f} "
          f"img/s | {t_ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
