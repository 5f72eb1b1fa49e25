"""Cache acceleration (issue 26): speed-up and drift of each cache method against the uncached run.

For each family's benchmark preset (``small-flux``, ``small-qwen-image``, made in code on first use under
``models/``), one request (``--size``, ``--steps``, seed 0) is denoised uncached and with each setting of
:data:`SETTINGS` (First-Block Cache over a sweep of thresholds, and DBCache layouts), the phases alternating in
every round. Each setting's denoise time is compared with the uncached one of the same round (median ratio over the
rounds), and its image (through the VAE) with the uncached image: PSNR (dB) and SSIM (8x8 windows, the luma of
uint8 RGB). Also the fraction of row-steps the cache skipped.

The presets are random tiny weights, not trained ones: how much a trained model's first-block residual changes
between steps (and so what a threshold skips and what it costs in quality) differs; re-measure on real weights.

Usage: ``python tools/bench_cache.py [--rounds 2] [--steps 28] [--size 64] [--families small-flux,...]``;
``--markdown`` prints the table for docs/BENCHMARKS.md; ``--settings '[{"method": "first_block", "threshold": 0.3}]'``
measures those instead of :data:`SETTINGS`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omni_runtime.runtime.model_store import ensure_model
from omni_runtime.runtime.requests import GenerationRequest
from omni_runtime.stages.cache_config import CacheConfig, parse_cache
from omni_runtime.stages.engine import StageItem, load_engine

ROOT = Path(__file__).resolve().parent.parent
SETTINGS: list[CacheConfig] = [
    *(CacheConfig("first_block", t) for t in (0.05, 0.1, 0.2, 0.3, 0.5)),
    *(CacheConfig("dbcache", t, fn=1, bn=1, warmup_steps=4, max_cached_steps=3) for t in (0.2, 0.5)),
    *(CacheConfig("teacache", t) for t in (0.3, 0.6)),  # Flux only (no coefficients for Qwen-Image)
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 8) -> float:
    """Mean SSIM of the luma over ``window`` x ``window`` box windows (Wang et al. 2004 constants)."""
    def luma(x: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(x.astype(np.float64))
        return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[None, None]
    x, y = luma(a), luma(b)
    mu_x, mu_y = F.avg_pool2d(x, window, 1), F.avg_pool2d(y, window, 1)
    var_x = F.avg_pool2d(x * x, window, 1) - mu_x ** 2
    var_y = F.avg_pool2d(y * y, window, 1) - mu_y ** 2
    cov = F.avg_pool2d(x * y, window, 1) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


def label(c: CacheConfig | None) -> str:
    if c is None:
        return "uncached"
    if c.method in ("first_block", "teacache"):
        return f"{c.method} {c.threshold:g}"
    return f"dbcache {c.threshold:g} F{c.fn}B{c.bn} w{c.warmup_steps} cap{c.max_cached_steps}"


def bench_family(name: str, rounds: int, steps: int, size: int, only: list[CacheConfig] | None = None
                 ) -> list[dict]:
    path = ensure_model(str(ROOT / "models" / name))
    te, den, vae = (load_engine(s, path, "float32", "cpu") for s in ("text_encoder", "denoiser", "vae"))
    params = GenerationRequest(prompt="a lighthouse on a cliff at dusk", width=size, height=size,
                               num_inference_steps=steps, seed=0)
    embeds = te.step([StageItem(params, 0)])[0]
    settings: list[CacheConfig | None] = [None, *(c for c in (only or SETTINGS) if c.method != "teacache"
                                                  or den.stage.model._cache_plan.teacache)]
    times: dict[str, list[float]] = {label(c): [] for c in settings}
    images: dict[str, np.ndarray] = {}
    skipped: dict[str, float] = {}
    for _ in range(rounds):
        for c in settings:
            item = StageItem(GenerationRequest(**{**{f: getattr(params, f) for f in params.__struct_fields__},
                                                  "cache": c}), 0, embeds)
            den.admit(1, item)
            t0 = time.perf_counter()
            while True:
                out = den.run_step()
                if out:
                    break
            times[label(c)].append(time.perf_counter() - t0)
            stats = den.cache_stats(1)
            skipped[label(c)] = stats["cached_steps"] / stats["steps"] if stats else 0.0
            images[label(c)] = vae.step([StageItem(params, 0, out[1])])[0]
    base = times["uncached"]
    rows = []
    for c in settings:
        k = label(c)
        rows.append({"family": name, "setting": k, "time_s": statistics.median(times[k]),
                     "speedup": statistics.median(b / t for b, t in zip(base, times[k], strict=True)),
                     "skipped": skipped[k], "psnr": psnr(images[k], images["uncached"]),
                     "ssim": ssim(images[k], images["uncached"])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--families", default="small-flux,small-qwen-image")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--settings", default="", help="a JSON list of cache objects instead of SETTINGS")
    args = ap.parse_args()
    torch.manual_seed(0)
    only = [parse_cache(c) for c in json.loads(args.settings)] if args.settings else None
    rows = [r for fam in args.families.split(",")
            for r in bench_family(fam, args.rounds, args.steps, args.size, only)]
    if args.markdown:
        print("| model | setting | denoise s | speed-up | row-steps skipped | PSNR dB | SSIM |")
        print("|---|---|---|---|---|---|---|")
    for r in rows:
        p = "inf" if math.isinf(r["psnr"]) else f"{r['psnr']:.1f}"
        if args.markdown:
            print(f"| {r['family']} | {r['setting']} | {r['time_s']:.2f} | {r['speedup']:.2f}x | "
                  f"{r['skipped']:.0%} | {p} | {r['ssim']:.3f} |")
        else:
            print(f"{r['family']:18} {r['setting']:34} {r['time_s']:7.2f}s {r['speedup']:5.2f}x "
                  f"skipped {r['skipped']:4.0%}  PSNR {p:>5} dB  SSIM {r['ssim']:.3f}")


if __name__ == "__main__":
    main()
