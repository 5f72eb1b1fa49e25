"""What the in-process running-set benchmarks share (``bench_batch_invariant.py``, ``bench_mixed_sizes.py``): their
common flags, the denoiser stage, synthetic requests, one timed drain of a ``RunningSet`` and the relative
difference to a solo run."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TEXT_TOKENS = 77


def parser(doc: str, k: str, rounds_help: str) -> argparse.ArgumentParser:
    """The flags both tools take (``--preset --k --steps --rounds --threads``); each adds its sizes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--k", default=k, help="requests in the running set")
    p.add_argument("--steps", type=int, default=4, help="steps timed per phase")
    p.add_argument("--rounds", type=int, default=3, help=rounds_help)
    p.add_argument("--threads", type=int, default=2)
    return p


def setup(args: argparse.Namespace) -> Any:
    """Logging, torch threads, and the preset's denoiser stage (made on first use, no download)."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from omni_runtime.runtime.model_store import ensure_model
    from omni_runtime.stages.denoiser import DenoiserStage

    return DenoiserStage.from_pretrained(ensure_model(str(ROOT / "models" / f"{args.preset}-flux")))


def request(stage: Any, i: int, width: int, height: int, steps: int) -> Any:
    """Request ``i``: seeded random prompt embeddings of the stage's dimensions, seed ``i``."""
    from omni_runtime.stages.denoiser import DenoiseRequest

    g = torch.Generator().manual_seed(i)
    dim = int(stage.config.get("joint_attention_dim") or 32)
    pooled = int(stage.config.get("pooled_projection_dim") or dim)
    return DenoiseRequest(embeds={"prompt_embeds": torch.randn(TEXT_TOKENS, dim, generator=g),
                                  "pooled_prompt_embeds": torch.randn(pooled, generator=g)},
                          seed=i, height=height, width=width, num_inference_steps=steps)


def drain(rs: Any, requests: dict[int, Any], steps: int) -> tuple[float, dict[int, torch.Tensor]]:
    """Admit ``requests`` (slot -> request) into the running set ``rs`` and step it until empty: seconds per step
    and the final latents by slot."""
    for slot, req in requests.items():
        rs.admit(slot, req)
    out: dict[int, torch.Tensor] = {}
    t0 = time.perf_counter()
    while len(rs):
        out.update(rs.step())
    return (time.perf_counter() - t0) / steps, out


def rel_diff(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's largest magnitude (0: bit-identical)."""
    return float((x - ref).abs().max() / ref.abs().max())
