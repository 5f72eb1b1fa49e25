"""Per-request LoRA (issue 25): the cost of LoRA rows, and 4 adapters in one running set vs merge/unmerge.

On the ``small`` preset (made in code), with ``--adapters`` adapters of rank ``--rank`` on every linear layer of the
transformer blocks (written in diffusers' LoRA layout), it times, alternating the phases in every round:

- ``plain x4``: one running set of 4 requests without LoRA (the baseline);
- ``1 adapter x4``: the same 4 requests, all with the same adapter (one segment);
- ``4 adapters x4``: the same 4 requests, each with its own adapter (4 segments in every forward);
- ``merge/unmerge x4``: what servers with one merged adapter set do: for each adapter, merge it into the weights
  (``W += s * alpha/r * B @ A``), denoise its request alone, unmerge;
- ``plain x1 seq``: the 4 requests one after another without LoRA (what merge/unmerge costs beyond the merges).

It prints the median time of each phase over the rounds and its median per-round ratio to ``plain x4``.

Usage: ``python tools/bench_lora.py [--rounds 5] [--steps 4] [--size 256] [--rank 16]``. Ratios matter; times
depend on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from omni_runtime.stages.denoiser import DenoiseRequest, DenoiserStage
from omni_runtime.stages.lora import LoraSpec
from omni_runtime.stages.models.flux.tiny import make_tiny_model


def _adapter(model: nn.Module, path: Path, seed: int, rank: int) -> Path:
    """An adapter on every linear layer of the blocks, in diffusers' layout (alpha = rank: scale 1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and "blocks." in name:
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.02
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.02
    save_file(state, str(path))
    return path


def _merge(stage: DenoiserStage, spec: LoraSpec, sign: float) -> None:
    ad = stage.lora.get(spec)
    lins = dict(stage.model.named_modules())
    with torch.no_grad():
        for name, layer in ad.layers.items():
            lins[name].weight.add_(layer.B @ layer.A, alpha=sign * spec.scale * layer.scaling)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, default=4)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    model_dir = make_tiny_model(tmp / "small", preset="small", seed=0)
    stage = DenoiserStage.from_pretrained(model_dir)
    n = args.adapters
    specs = [LoraSpec(f"a{i}", str(_adapter(stage.model, tmp / f"a{i}.safetensors", i, args.rank)), 0, 1.0)
             for i in range(n)]
    for s in specs:
        stage.lora.get(s)  # loaded once: the phases time compute, not file reads
    cfg = stage.config
    g = torch.Generator().manual_seed(0)
    embeds = [{"prompt_embeds": torch.randn(64, cfg["joint_attention_dim"], generator=g),
               "pooled_prompt_embeds": torch.randn(cfg["pooled_projection_dim"], generator=g)} for _ in range(n)]

    def req(i: int, lora: tuple[LoraSpec, ...] = ()) -> DenoiseRequest:
        return DenoiseRequest(embeds=embeds[i], seed=i, height=args.size, width=args.size,
                              num_inference_steps=args.steps, lora=lora)

    def merged() -> None:
        for i, s in enumerate(specs):
            _merge(stage, s, 1.0)
            stage.denoise([req(i)])
            _merge(stage, s, -1.0)

    phases = {
        f"plain x{n}": lambda: stage.denoise([req(i) for i in range(n)]),
        f"1 adapter x{n}": lambda: stage.denoise([req(i, (specs[0],)) for i in range(n)]),
        f"{n} adapters x{n}": lambda: stage.denoise([req(i, (specs[i],)) for i in range(n)]),
        f"merge/unmerge x{n}": merged,
        "plain x1 seq": lambda: [stage.denoise([req(i)]) for i in range(n)],
    }
    # the merged result equals the unmerged one (a check that the bench compares like with like)
    a = stage.denoise([req(0, (specs[0],))])[0]
    _merge(stage, specs[0], 1.0)
    b = stage.denoise([req(0)])[0]
    _merge(stage, specs[0], -1.0)
    rel = ((a - b).abs().max() / b.abs().max()).item()
    print(f"bench_lora: small preset, {args.size}x{args.size}, {args.steps} steps, {n} requests, rank {args.rank} "
          f"on every block linear, {torch.get_num_threads()} threads, {args.rounds} rounds alternating; "
          f"unmerged vs merged latents rel {rel:.1e}")
    for fn in phases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in phases}
    for _ in range(args.rounds):
        for k, fn in phases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    base = f"plain x{n}"
    print(f"{'phase':20} {'median s':>9} {'ratio to ' + base:>18}")
    for k, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, times[base], strict=True))
        print(f"{k:20} {statistics.median(ts):9.3f} {ratio:18.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
