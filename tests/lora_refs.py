"""LoRA adapters made in code for the tests (no download): peft adds them to diffusers' transformer of a tiny
model, diffusers' ``save_lora_weights`` writes them in its own layout, exactly what a user's trained file is."""

from __future__ import annotations

from pathlib import Path

import torch

FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "proj_mlp", "proj_out",
                "ff.net.0.proj", "ff.net.2", "norm1.linear", "x_embedder"]
QWEN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "img_mlp.net.0.proj",
                "img_mlp.net.2", "txt_mlp.net.2", "img_mod.1", "img_in"]


def make_lora(model_dir: Path, out: Path, *, seed: int, rank: int = 4, alpha: float | None = 8,
              targets: list[str] | None = None, qwen: bool = False, amp: float = 0.05) -> Path:
    """An adapter file for the transformer of ``model_dir`` at ``out`` (``alpha=None``: no metadata, so diffusers
    and we use alpha = rank)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, QwenImagePipeline, QwenImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    tcls, pcls = (QwenImageTransformer2DModel, QwenImagePipeline) if qwen else (FluxTransformer2DModel, FluxPipeline)
    tr = tcls.from_pretrained(model_dir, subfolder="transformer")
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                     target_modules=targets or (QWEN_TARGETS if qwen else FLUX_TARGETS), init_lora_weights=False)
    tr.add_adapter(cfg, adapter_name="x")
    sd = get_peft_model_state_dict(tr, adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * amp for k, v in sd.items()}  # the seed picks the weights
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = None
    if alpha is not None:
        meta = cfg.to_dict()
        meta["target_modules"] = sorted(meta["target_modules"])
    pcls.save_lora_weights(out.parent, transformer_lora_layers=sd, weight_name=out.name,
                           transformer_lora_adapter_metadata=meta)
    return out
