"""Helper for tests (no tests here): the three stages of a model, and DenoiseRequests built from prompts, to check
each stage's numbers against diffusers. Serving (batching, handoff, cancellation) is the runtime's, tested
through ``Omni`` and ``serve``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from omni_runtime.runtime.config import RuntimeConfig
from omni_runtime.runtime.config_load import config_from_dict, tomllib
from omni_runtime.stages import DenoiseRequest, DenoiserStage, TextEncoderStage, VaeDecoderStage


def flux_request(prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, **kw) -> DenoiseRequest:
    """A Flux :class:`DenoiseRequest` from its tensors (the negative ones only when given)."""
    embeds = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
    if negative_prompt_embeds is not None:
        embeds["negative_prompt_embeds"] = negative_prompt_embeds
    if negative_pooled_prompt_embeds is not None:
        embeds["negative_pooled_prompt_embeds"] = negative_pooled_prompt_embeds
    return DenoiseRequest(embeds=embeds, **kw)


def encoded_requests(text_encoder: TextEncoderStage, cases: list[tuple], steps: int,
                     max_sequence_length: int = 16) -> list[DenoiseRequest]:
    """Flux :class:`DenoiseRequest` s of ``cases`` — ``(prompt, negative prompt or None, seed, height, width,
    true_cfg_scale)`` each — with ``steps`` steps, their prompts encoded by ``text_encoder``: the one builder the
    parallel-layout tests (Ulysses/Ring, CFG, layer PP, PipeFusion) share."""
    reqs = []
    for prompt, neg, seed, h, w, cfg in cases:
        enc = text_encoder.encode(prompt, max_sequence_length=max_sequence_length)
        nenc = text_encoder.encode(neg, max_sequence_length=max_sequence_length) if neg else None
        reqs.append(flux_request(
            prompt_embeds=enc["prompt_embeds"][0], pooled_prompt_embeds=enc["pooled_prompt_embeds"][0], seed=seed,
            height=h, width=w, num_inference_steps=steps, true_cfg_scale=cfg,
            negative_prompt_embeds=nenc["prompt_embeds"][0] if nenc else None,
            negative_pooled_prompt_embeds=nenc["pooled_prompt_embeds"][0] if nenc else None))
    return reqs


def load_stages(path: str | Path, dtype: str = "float32") -> SimpleNamespace:
    return SimpleNamespace(text_encoder=TextEncoderStage.from_pretrained(path, dtype, "cpu"),
                           denoiser=DenoiserStage.from_pretrained(path, dtype, "cpu"),
                           vae=VaeDecoderStage.from_pretrained(path, dtype, "cpu"))


def denoise_requests(stages: SimpleNamespace, prompt: str | list[str], *, negative_prompt: str | None = None,
                     seed: int | list[int] = 0, num_inference_steps: int = 28, height: int = 1024,
                     width: int = 1024, guidance_scale: float = 3.5, true_cfg_scale: float = 1.0,
                     max_sequence_length: int = 512) -> list[DenoiseRequest]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
    enc = stages.text_encoder.encode(prompts, max_sequence_length=max_sequence_length)
    do_cfg = negative_prompt is not None and true_cfg_scale > 1
    neg = (stages.text_encoder.encode([negative_prompt] * len(prompts), max_sequence_length=max_sequence_length)
           if do_cfg else None)
    return [flux_request(
        prompt_embeds=enc["prompt_embeds"][i], pooled_prompt_embeds=enc["pooled_prompt_embeds"][i], seed=seeds[i],
        height=height, width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        true_cfg_scale=true_cfg_scale, negative_prompt_embeds=neg["prompt_embeds"][i] if neg else None,
        negative_pooled_prompt_embeds=neg["pooled_prompt_embeds"][i] if neg else None) for i in range(len(prompts))]


def decode(stages: SimpleNamespace, latents: list[torch.Tensor], height: int, width: int) -> list:
    return stages.vae.decode(torch.stack(latents), height, width)


def single_rank_config(config_path: str | Path) -> RuntimeConfig:
    """The config at ``config_path`` with every stage's ``parallel`` table (and ``devices`` list) removed: the default single-rank
    layout of the same model and settings, the reference every parallel layout is compared against (and what
    ``Omni(..., in_process=True)`` accepts)."""
    path = Path(config_path)
    raw = tomllib.loads(path.read_text())
    raw["stages"] = {name: {k: v for k, v in table.items() if k not in ("parallel", "devices")}
                     for name, table in raw.get("stages", {}).items()}
    return config_from_dict(raw, base_dir=path.resolve().parent, source=str(path))


def diffusers_pipeline(name: str, model: str | Path, dtype: str | None = "float32") -> Any:
    """diffusers' pipeline class ``name`` on the model directory ``model`` (an embedded tiny one is made on first
    use), in ``dtype`` (None: the checkpoint's own), its progress bar off: a test's reference."""
    import diffusers

    from omni_runtime.runtime.model_store import ensure_model

    kw = {} if dtype is None else {"dtype": getattr(torch, dtype)}
    pipe = getattr(diffusers, name).from_pretrained(str(ensure_model(str(model))), **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def first_block_cache_skips(transformer: Any, leader: Any, threshold: float) -> list[bool]:
    """diffusers' First Block Cache on ``transformer`` (``leader``: its first block) at ``threshold``; the list it
    returns grows by one decision per (step, branch) forward: True where the remaining blocks were skipped."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=threshold))
    hook = leader._diffusers_hook.get_hook("fbc_leader_block_hook")
    skipped: list[bool] = []
    decide = hook._should_compute_remaining_blocks
    hook._should_compute_remaining_blocks = lambda r: (skipped.append(not decide(r)) or not skipped[-1])
    return skipped


def flux_transformer_inputs(cfg: Any, n_img: int, grid_width: int, timesteps: list[float]) -> dict[str, torch.Tensor]:
    """Seeded random inputs of a Flux transformer of config ``cfg``: one row per timestep, ``n_img`` image tokens on
    a grid ``grid_width`` wide, 8 text tokens, guidance 3.5."""
    g = torch.Generator().manual_seed(0)
    rows, n_txt = len(timesteps), 8
    return dict(hidden_states=torch.randn(rows, n_img, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(rows, n_txt, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(rows, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor(timesteps),
                img_ids=torch.stack([torch.zeros(n_img), torch.arange(n_img) // grid_width,
                                     torch.arange(n_img) % grid_width], 1),
                txt_ids=torch.zeros(n_txt, 3), guidance=torch.tensor([3.5] * rows))
