"""Write a complete tiny diffusers-format model: the CLI over ``omni_runtime.stages.models.flux.tiny`` (FLUX.1) and
``omni_runtime.stages.models.qwen_image.tiny`` (Qwen-Image).

Usage: ``python tools/make_tiny_model.py OUT_DIR [--family flux|qwen_image|flux_kontext|wan|qwen_image_edit|qwen_image_edit_plus] [--preset tiny|small] [--seed N]
[--moe-experts N --moe-top-k K]``.

``--family`` picks the model family (default ``flux``, a ``FluxPipeline`` directory; ``qwen_image`` writes a
``QwenImagePipeline`` one; ``flux_kontext`` the flux weights as a ``FluxKontextPipeline``, the image-edit model;
``qwen_image_edit`` / ``qwen_image_edit_plus`` a ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline``: the
qwen_image weights with a ``processor/`` and the gains documented in ``stages/models/qwen_image/edit_tiny.py``). ``--moe-experts`` (flux only) makes the single-stream blocks' MLP a mixture of experts
(our loader reads it; diffusers cannot).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omni_runtime.stages.models.family import family_for_class
from omni_runtime.stages.models.flux.tiny import PRESETS, make_tiny_model
from omni_runtime.stages.models.qwen_image.tiny import PRESETS as QWEN_IMAGE_PRESETS
from omni_runtime.stages.models.qwen_image.tiny import make_tiny_qwen_image
from omni_runtime.stages.models.wan.tiny import make_tiny_wan

FAMILIES = ("flux", "qwen_image", "flux_kontext", "wan", "qwen_image_edit", "qwen_image_edit_plus")
#: --family -> the pipeline class whose family's ``make_tiny`` writes it (the families not made by a function below)
BY_CLASS = {"flux_kontext": "FluxKontextPipeline", "qwen_image_edit": "QwenImageEditPipeline",
            "qwen_image_edit_plus": "QwenImageEditPlusPipeline"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the model into (created if missing)")
    parser.add_argument("--family", choices=FAMILIES, default="flux",
                        help="model family: flux (FluxPipeline), qwen_image (QwenImagePipeline), flux_kontext "
                             "(FluxKontextPipeline: the flux weights, an image-edit pipeline) or wan (WanPipeline)")
    parser.add_argument("--preset", choices=sorted(set(PRESETS) | set(QWEN_IMAGE_PRESETS)), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--moe-experts", type=int, default=0,
                        help="routed experts in each single-stream block's MoE FFN (0: dense MLP; flux only)")
    parser.add_argument("--moe-top-k", type=int, default=2, help="experts per token (with --moe-experts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.family != "flux" and args.moe_experts:
        parser.error(f"--moe-experts is for --family flux only ({args.family} has no MoE variant)")
    try:
        if args.family == "qwen_image":
            out = make_tiny_qwen_image(args.out_dir, preset=args.preset, seed=args.seed)
        elif args.family in BY_CLASS:
            out = family_for_class(BY_CLASS[args.family]).make_tiny(Path(args.out_dir), args.preset, args.seed)
        elif args.family == "wan":
            out = make_tiny_wan(args.out_dir, preset=args.preset, seed=args.seed)
        else:
            out = make_tiny_model(args.out_dir, preset=args.preset, seed=args.seed, moe_experts=args.moe_experts,
                                  moe_top_k=args.moe_top_k)
    except ValueError as e:
        parser.error(str(e).replace("moe_experts=", "--moe-experts ").replace("moe_top_k=", "--moe-top-k "))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
