"""Write a complete diffusers-format FLUX.1-style model directory with deterministic random weights.

No machine of this project can download weights, so tests, benchmarks and the default config use what this
script writes. The result loads with diffusers' own ``FluxPipeline.from_pretrained(dir)``:

    model_index.json
    transformer/      FluxTransformer2DModel   (config.json + diffusion_pytorch_model.safetensors)
    vae/              AutoencoderKL            (16 latent channels, downsamples by 8, FLUX scaling/shift)
    text_encoder/     CLIPTextModel            tokenizer/    CLIPTokenizer (byte-level BPE built here)
    text_encoder_2/   T5EncoderModel           tokenizer_2/  T5TokenizerFast (Unigram built here)
    scheduler/        FlowMatchEulerDiscreteScheduler (FLUX shift, dynamic shifting)

From the shell: ``python tools/make_tiny_model.py OUT_DIR [--preset tiny|small] [--seed N]``; the runtime calls
:func:`make_tiny_model` to create the default model on first use (also from a wheel install).

``--moe-experts N --moe-top-k K`` (``moe_experts=N``) makes an MoE DiT: the single-stream blocks' MLP becomes a
``parallel.moe.MoEFeedForward`` (N routed SwiGLU experts, top-K routing, one shared expert) and ``proj_out``
projects only the attention. The directory stays diffusers-format and our loader reads it, but diffusers itself
cannot load that transformer (its FluxTransformer2DModel has no MoE: unexpected ``ff.*`` keys, no ``proj_mlp``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from omni_runtime.stages.models import tiny_common
from omni_runtime.stages.models.byte_bpe import bytes_to_unicode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset(tiny_common.TransformerSizes):
    """Sizes of every component; ``tiny`` is for tests, ``small`` makes compute dominate for benchmarks."""

    # transformer (and the block counts and heads of ``TransformerSizes``)
    num_single_layers: int
    axes_dims_rope: tuple[int, int, int]
    guidance_embeds: bool
    # vae
    vae_block_out_channels: tuple[int, ...]
    vae_norm_num_groups: int
    # text encoders
    clip_hidden: int
    clip_layers: int
    clip_heads: int
    t5_d_model: int
    t5_layers: int
    t5_heads: int
    t5_d_kv: int
    t5_d_ff: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
        axes_dims_rope=(4, 6, 6), guidance_embeds=True,
        vae_block_out_channels=(8, 16, 16, 16), vae_norm_num_groups=4,
        clip_hidden=32, clip_layers=1, clip_heads=2,
        t5_d_model=32, t5_layers=1, t5_heads=2, t5_d_kv=16, t5_d_ff=64,
    ),
    "small": Preset(
        num_layers=2, num_single_layers=4, num_attention_heads=6, attention_head_dim=64,
        axes_dims_rope=(16, 24, 24), guidance_embeds=True,
        vae_block_out_channels=(16, 32, 32, 32), vae_norm_num_groups=8,
        clip_hidden=64, clip_layers=2, clip_heads=2,
        t5_d_model=128, t5_layers=2, t5_heads=4, t5_d_kv=32, t5_d_ff=256,
    ),
}

CLIP_MAX_LENGTH = 77
T5_WORDS = ("a", "the", "of", "and", "cat", "dog", "photo", "in", "on", "with")  # word starts of the T5 vocabulary
# FLUX.1 VAE latent statistics.
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159


def _clip_tokenizer():
    """A byte-level BPE CLIP tokenizer whose vocabulary is every byte (alone and word-final) plus a few merges."""
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    # A handful of merges so common words become fewer tokens: "th", "the</w>", "an", "a</w>" style pairs.
    for left, right in [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n")]:
        merged = left + right
        if merged not in vocab:
            vocab[merged] = len(vocab)
        merges.append((left, right))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    return tok, vocab, merges


def _text_encoders(p: Preset, clip_tok, t5_tok):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_cfg = CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=p.clip_hidden, intermediate_size=4 * p.clip_hidden,
        num_hidden_layers=p.clip_layers, num_attention_heads=p.clip_heads,
        max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=p.clip_hidden, hidden_act="quick_gelu",
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
    )
    clip = CLIPTextModel(clip_cfg)
    t5_cfg = T5Config(
        vocab_size=len(t5_tok), d_model=p.t5_d_model, d_kv=p.t5_d_kv, d_ff=p.t5_d_ff, num_layers=p.t5_layers,
        num_heads=p.t5_heads, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
        pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=0,
    )
    t5 = T5EncoderModel(t5_cfg)
    return clip.eval(), t5.eval()


def _transformer(p: Preset):
    from diffusers import FluxTransformer2DModel

    assert sum(p.axes_dims_rope) == p.attention_head_dim
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=None, num_layers=p.num_layers,
        num_single_layers=p.num_single_layers, attention_head_dim=p.attention_head_dim,
        num_attention_heads=p.num_attention_heads, joint_attention_dim=p.t5_d_model,
        pooled_projection_dim=p.clip_hidden, guidance_embeds=p.guidance_embeds,
        axes_dims_rope=p.axes_dims_rope,
    ).eval()


def _vae(p: Preset):
    from diffusers import AutoencoderKL

    n = len(p.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=p.vae_block_out_channels,
        layers_per_block=1, act_fn="silu", latent_channels=16, norm_num_groups=p.vae_norm_num_groups,
        sample_size=256, scaling_factor=VAE_SCALING_FACTOR, shift_factor=VAE_SHIFT_FACTOR,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
    ).eval()


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def _make_moe_transformer(transformer_dir: Path, experts: int, top_k: int, seed: int) -> None:
    """Rewrite ``transformer_dir`` in place as the MoE variant: every weight the dense model shares with it is
    kept (single-stream ``proj_out`` keeps its attention columns), the MoE FFNs get seeded random weights."""
    from safetensors.torch import save_file

    from omni_runtime.stages.models.flux.transformer import FluxConfig, FluxTransformer
    from omni_runtime.stages.weights import load_safetensors

    cfg = json.loads((transformer_dir / "config.json").read_text())
    cfg.update(moe_num_experts=experts, moe_top_k=top_k, moe_hidden_dim=0, moe_shared_expert=True)
    config = FluxConfig.from_dict(cfg, transformer_dir / "config.json")
    dense = load_safetensors(transformer_dir)
    with tiny_common.seeded(seed + 1):
        state = FluxTransformer(config).state_dict()
    dim = config.inner_dim
    for key, value in dense.items():
        if key.startswith("single_transformer_blocks.") and key.endswith("proj_out.weight"):
            state[key] = value[:, :dim]
        elif key in state:
            state[key] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(transformer_dir / "diffusion_pytorch_model.safetensors"))
    (transformer_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_tiny_model(path: str | Path, preset: str = "tiny", seed: int = 0, moe_experts: int = 0,
                    moe_top_k: int = 2) -> Path:
    """Write a FLUX.1-style diffusers model directory at ``path`` and return it.

    Weights are a function of ``(preset, seed, moe_experts, moe_top_k)`` only. ``preset`` is one of ``PRESETS``
    (``tiny``, ``small``). ``moe_experts > 0`` makes the MoE variant (see the module docstring).
    """
    p = tiny_common.check_preset(PRESETS, preset)
    if isinstance(moe_experts, bool) or not isinstance(moe_experts, int) or moe_experts < 0:
        raise ValueError(f"moe_experts={moe_experts!r}: must be an integer >= 0 (0: no MoE)")
    if moe_experts and (isinstance(moe_top_k, bool) or not isinstance(moe_top_k, int)
                        or not 1 <= moe_top_k <= moe_experts):
        raise ValueError(f"moe_top_k={moe_top_k!r}: must be an integer from 1 to moe_experts={moe_experts}")
    from diffusers import FluxPipeline

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (clip_tok, clip_vocab, clip_merges), t5_tok = _clip_tokenizer(), tiny_common.t5_unigram_tokenizer(T5_WORDS)
    with tiny_common.seeded(seed):  # the caller's global RNG state is left as it was
        transformer = _transformer(p)
        vae = _vae(p)
        clip, t5 = _text_encoders(p, clip_tok, t5_tok)
    pipe = FluxPipeline(
        scheduler=_scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
        tokenizer_2=t5_tok, transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # tokenizer_2 as FLUX.1 checkpoints name it rather than the class alias transformers 5 resolves it to, so the
    # directory also loads with transformers 4 (where the slow T5Tokenizer would need a sentencepiece file)
    tiny_common.update_model_index(out / "model_index.json", tokenizer_2=["transformers", "T5TokenizerFast"])
    tiny_common.write_bpe_vocab_files(out / "tokenizer", clip_vocab, clip_merges)
    if moe_experts:
        _make_moe_transformer(out / "transformer", moe_experts, moe_top_k, seed)
    logger.info("wrote %s model (seed %d) to %s", preset, seed, out)
    return out


# A transformer-only directory big enough to see memory effects (~216 MB of fp32 weights): the tiny model's layout
# with its dims raised. Used by the HSDP load-memory test and tools/bench_parallel.py.
BIG_TRANSFORMER: dict = dict(num_layers=2, num_single_layers=4, num_attention_heads=10, attention_head_dim=64,
                             axes_dims_rope=[16, 24, 24], joint_attention_dim=32, pooled_projection_dim=32,
                             in_channels=64, guidance_embeds=True)


def make_big_transformer(path: str | Path, seed: int = 0, **dims: int) -> int:
    """Write ``path/config.json`` + ``diffusion_pytorch_model.safetensors`` of a FLUX transformer with
    :data:`BIG_TRANSFORMER`'s dims (``dims`` override them) and random weights (std 0.02); returns the weight bytes.

    Faster than :func:`make_tiny_model` for big sizes: no diffusers model is built, only the tensors."""
    from safetensors.torch import save_file

    from omni_runtime.stages.models.flux.transformer import FluxConfig, FluxTransformer

    config = {**BIG_TRANSFORMER, **dims}
    cfg = FluxConfig(**{**config, "axes_dims_rope": tuple(config["axes_dims_rope"])})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxTransformer(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "diffusion_pytorch_model.safetensors"))
    (out / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **config}))
    return sum(t.numel() * t.element_size() for t in state.values())
