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


#: a diffusers adapter whose layers kohya's Flux layout can express on the tiny model (double-block linears, the
#: single block's linear2 / modulation; kohya's single-block linear1 has Flux-dev's fixed split sizes)
KOHYA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                 "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                 "norm1_context.linear", "norm.linear", "proj_out"]


def to_kohya_flux(diffusers_file: Path, out: Path, *, blocks: int = 1, single_blocks: int = 1) -> int:
    """Write the adapter of ``diffusers_file`` (diffusers' layout, ``lora_alpha`` / ``r`` in its metadata) in
    kohya's ``lora_unet_*`` layout: the inverse of diffusers' ``_convert_kohya_flux_lora_to_diffusers`` for the
    double-block linears and the single block's linear2 / modulation (fused qkv as kohya's sparse form: ``lora_down``
    the ranks stacked, ``lora_up`` block-diagonal; ``alpha`` = scale * rank). Layers kohya cannot express here
    are left out. Returns the number of diffusers layers written."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(diffusers_file), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    meta = meta.get("transformer", {k[len("transformer."):]: v for k, v in meta.items()
                                     if k.startswith("transformer.")})
    scaling = meta["lora_alpha"] / meta["r"]

    def ab(mod: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        a, b = sd.get(f"transformer.{mod}.lora_A.weight"), sd.get(f"transformer.{mod}.lora_B.weight")
        return None if a is None else (a, b)

    kohya: dict[str, torch.Tensor] = {}
    written = 0

    def put(name: str, mods: list[str]) -> None:
        nonlocal written
        parts = [ab(m) for m in mods]
        if any(p is None for p in parts):
            return
        down = torch.cat([a for a, _ in parts])
        up = torch.block_diag(*[b for _, b in parts])
        kohya[f"{name}.lora_down.weight"] = down.contiguous()
        kohya[f"{name}.lora_up.weight"] = up.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(scaling * down.shape[0])
        written += len(mods)

    for i in range(blocks):
        t = f"transformer_blocks.{i}"
        put(f"lora_unet_double_blocks_{i}_img_attn_qkv", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"])
        put(f"lora_unet_double_blocks_{i}_txt_attn_qkv",
            [f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj"])
        for kname, mod in [("img_attn_proj", "attn.to_out.0"), ("img_mlp_0", "ff.net.0.proj"), ("img_mlp_2", "ff.net.2"),
                           ("img_mod_lin", "norm1.linear"), ("txt_attn_proj", "attn.to_add_out"),
                           ("txt_mlp_0", "ff_context.net.0.proj"), ("txt_mlp_2", "ff_context.net.2"),
                           ("txt_mod_lin", "norm1_context.linear")]:
            put(f"lora_unet_double_blocks_{i}_{kname}", [f"{t}.{mod}"])
    for i in range(single_blocks):
        put(f"lora_unet_single_blocks_{i}_linear2", [f"single_transformer_blocks.{i}.proj_out"])
        put(f"lora_unet_single_blocks_{i}_modulation_lin", [f"single_transformer_blocks.{i}.norm.linear"])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(out), metadata={"ss_network_module": "networks.lora_flux"})
    return written
