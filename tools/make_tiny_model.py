"""Write a complete tiny diffusers-format FLUX.1-style model: the CLI over ``omni_runtime.stages.models.tiny``.

Usage: ``python tools/make_tiny_model.py OUT_DIR [--preset tiny|small] [--seed N]``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from omni_runtime.stages.models.tiny import PRESETS, make_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the model into (created if missing)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = make_tiny_model(args.out_dir, preset=args.preset, seed=args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
