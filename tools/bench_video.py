"""Video serving benchmark (``python tools/bench_serving.py video ...``): ``POST /v1/videos/sync`` of
``omni-runtime serve`` (configs/wan.toml on the embedded ``small-wan``) against diffusers' ``WanPipeline`` called
in-process on the same directory, and sequence-parallel scaling (ulysses 2, ring 2 against the default layout on
the same cores) on a longer video sequence.

Every server of the run is started first (one per layout, all held), then each round times diffusers once and every
server once, in alternation, with a pause before each; the table gives the median seconds per side and the median
of the per-round ratios (so a noisy neighbour hits every side alike).

Usage: ``python tools/bench_serving.py video [--preset small] [--size 128x128] [--frames 17] [--steps 4]
[--repeats 5] [--layouts default,ulysses2,ring2]``. Ratios matter; absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import ROOT, ServeProcess, ensure_model  # noqa: E402

PAUSE_S = 0.1
LAYOUTS = {"default": {}, "ulysses2": {"ulysses": 2}, "ring2": {"ring": 2}, "cfg2": {"cfg": 2},
           "ulysses2_ring2": {"ulysses": 2, "ring": 2}}


def _config(model: Path, degrees: dict[str, int]) -> str:
    text = (ROOT / "configs" / "wan.toml").read_text().replace('path = "../models/tiny-wan"', f'path = "{model}"')
    head, sep, tail = text.partition("[stages.denoiser.parallel]\n")
    for key, value in degrees.items():
        tail = tail.replace(f"{key} = 1", f"{key} = {value}", 1)
    text = head + sep + tail
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--size", default="128x128")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds (diffusers, then every server)")
    p.add_argument("--layouts", default="default,ulysses2,ring2", help=f"comma-separated of {', '.join(LAYOUTS)}")
    args = p.parse_args(argv)
    layouts = args.layouts.split(",")
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        p.error(f"--layouts {bad[0]!r}: allowed: {', '.join(LAYOUTS)}")
    width, height = (int(v) for v in args.size.lower().split("x"))
    model = ensure_model(args.preset, "wan")
    body = {"prompt": "a cat walking on a beach", "negative_prompt": "blurry", "size": args.size,
            "num_frames": args.frames, "num_inference_steps": args.steps, "guidance_scale": 5.0, "seed": 0}
    tokens = ((args.frames - 1) // 4 + 1) * (height // 16) * (width // 16)

    import torch
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)

    def diffusers_once() -> float:
        t0 = time.perf_counter()
        pipe(prompt=body["prompt"], negative_prompt=body["negative_prompt"], height=height, width=width,
             num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=5.0, output_type="np",
             generator=torch.Generator("cpu").manual_seed(0))
        return time.perf_counter() - t0

    servers = {name: ServeProcess(_config(model, LAYOUTS[name]), name=f"video-{name}", post_timeout_s=1800)
               for name in layouts}
    try:
        def serve_once(server: ServeProcess) -> float:
            t0 = time.perf_counter()
            r = server.client().post("/v1/videos/sync", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:2000]}")
            return time.perf_counter() - t0

        diffusers_once()  # warm-up, both sides
        for s in servers.values():
            serve_once(s)
        times: dict[str, list[float]] = {"diffusers": [], **{k: [] for k in servers}}
        for _ in range(args.repeats):
            time.sleep(PAUSE_S)
            times["diffusers"].append(diffusers_once())
            for name, s in servers.items():
                time.sleep(PAUSE_S)
                times[name].append(serve_once(s))
    finally:
        for s in servers.values():
            s.stop()
    print(f"WanPipeline {args.preset}-wan, {args.size}, {args.frames} frames ({tokens} video tokens per forward), "
          f"{args.steps} steps, CFG, {args.repeats} alternating rounds")
    print(f"{'side':<18}{'median s':>10}{'/ diffusers':>13}{'/ default':>11}")
    base = times.get("default")
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, times["diffusers"], strict=True))
        vs_default = (f"{statistics.median(a / b for a, b in zip(ts, base, strict=True)):>11.2f}"
                      if base is not None and name != "diffusers" else f"{'':>11}")
        print(f"{name:<18}{statistics.median(ts):>10.2f}{ratio:>13.2f}{vs_default}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
