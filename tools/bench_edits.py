"""Image-edit benchmark: ``POST /v1/images/edits`` through ``serve`` against diffusers' ``FluxKontextPipeline`` (or,
``--family qwen-image-edit``, ``QwenImageEditPipeline``) called in-process, same checkpoint (the embedded ``small``
preset), same machine, same run.

(a) latency of one edit through serve (HTTP multipart + text encoder, VAE encode, denoiser, VAE decode stages) vs
    one pipeline call (Kontext: ``image=..., _auto_resize=False, max_area=W*H``; Qwen-Image-Edit: ``image=...,
    width=W, height=H``: what the served result equals; its input image is encoded at about 1024x1024 whatever the
    output size);
(b) throughput with ``--clients`` concurrent clients vs diffusers editing one image at a time.

Phases alternate (diffusers, serve, diffusers, ...) with a pause before each, and the table reports the median of the
per-pair ratios, so a noisy neighbour hits both sides alike.

Usage: ``python tools/bench_edits.py [--family flux-kontext|qwen-image-edit] [--preset small] [--size 256x256]
[--steps 8] [--repeats 5] [--rounds 2] [--clients 4]``. The recorded runs (docs/BENCHMARKS.md) are ``--size 128x128
--steps 4 --repeats 3 --rounds 1`` (Kontext) and ``--family qwen-image-edit --preset tiny --size 64x64 --steps 4
--repeats 3 --rounds 0``.
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
#: --family -> (its config, the diffusers pipeline the served edits equal)
FAMILIES = {"flux-kontext": ("flux_kontext.toml", "FluxKontextPipeline"),
            "qwen-image-edit": ("qwen_image_edit.toml", "QwenImageEditPipeline")}


def _pipeline(model: Path):
    """The diffusers pipeline of ``model`` (Qwen-Image-Edit's with its processor as tests/qwen_edit_refs.py
    assembles it: ``Qwen2VLProcessor.from_pretrained`` needs torchvision)."""
    import torch

    if (model / "processor").is_dir():
        sys.path.insert(0, str(ROOT / "tests"))
        from qwen_edit_refs import pipeline

        return pipeline(model)
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(str(model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _input_png(width: int, height: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="flux-kontext", choices=sorted(FAMILIES))
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--size", default="256x256")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="alternating (diffusers, serve) latency pairs")
    p.add_argument("--rounds", type=int, default=2, help="alternating throughput pairs")
    p.add_argument("--clients", type=int, default=4, help="concurrent serve clients in the throughput phases")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    from PIL import Image

    width, height = (int(v) for v in args.size.split("x"))
    config, pipeline_name = FAMILIES[args.family]
    model = ensure_model(args.preset, args.family)
    image = _input_png(width, height)
    pipe = _pipeline(model)
    kontext = args.family == "flux-kontext"
    extra = {"max_area": width * height, "_auto_resize": False} if kontext else {}

    def diffusers_edit(seed: int) -> float:
        t0 = time.perf_counter()
        pipe(image=Image.open(io.BytesIO(image)).convert("RGB"), prompt=PROMPT, height=height, width=width,
             num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(seed), **extra)
        return time.perf_counter() - t0

    text = (ROOT / "configs" / config).read_text().replace(f'path = "../models/tiny-{args.family}"',
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
        through: list[tuple[float, float]] = []
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
    print(f"\n{args.preset}-{args.family}, {args.size} (input {args.size}), {args.steps} steps, float32 CPU")
    print(f"| measure | diffusers {pipeline_name} | serve /v1/images/edits | serve / diffusers |")
    print("|---|---|---|---|")
    print(f"| latency of one edit (median of {args.repeats} pairs) | {d_med:.2f} s | {s_med:.2f} s | {ratio:.2f}x |")
    if not through:
        return 0
    t_ratio = statistics.median(s / d for d, s in through)
    print(f"| throughput, {args.clients} clients vs one at a time ({args.rounds} rounds of {total} edits) | "
          f"{statistics.median(d for d, _ in through):.3f} img/s | {statistics.median(s for _, s in through):.3f} "
          f"img/s | {t_ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
