"""Write a complete diffusers-format Wan 2.1 text-to-video model directory with deterministic random weights.

The Wan counterpart of the other families' ``tiny.py`` (no machine of this project can download weights). The
``tiny`` preset has the sizes of diffusers' own WanPipeline test (tests/pipelines/wan/test_wan.py: 2 heads of 12,
text width 32, 2 layers, a VAE of base width 3); ``small`` makes compute dominate for benchmarks; ``tiny22`` is Wan
2.2's two experts at the tiny sizes (``transformer_2/`` with other weights, ``boundary_ratio`` in model_index.json). The result loads
with diffusers' own ``WanPipeline.from_pretrained(dir)``:

    model_index.json
    transformer/    WanTransformer3DModel          (config.json + diffusion_pytorch_model.safetensors)
    vae/            AutoencoderKLWan               (16 latent channels, 8x spatial / 4x temporal, seeded stats)
    text_encoder/   UMT5EncoderModel               (tiny)
    tokenizer/      T5TokenizerFast                (a Unigram vocabulary built here)
    scheduler/      FlowMatchEulerDiscreteScheduler (static shift 3.0)

From the shell: ``python tools/make_tiny_model.py OUT_DIR --family wan [--preset tiny|small] [--seed N]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omni_runtime.stages.models import tiny_common

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset(tiny_common.TransformerSizes):
    ffn_dim: int
    text_dim: int  # UMT5's d_model
    text_layers: int
    text_heads: int
    text_ff: int
    vae_base_dim: int
    #: Wan 2.2's two experts: ``transformer_2`` (other weights, same sizes) runs below this x 1000 (None: Wan 2.1)
    boundary_ratio: float | None = None


PRESETS: dict[str, Preset] = {
    "tiny": Preset(num_layers=2, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, text_dim=32,
                   text_layers=2, text_heads=2, text_ff=64, vae_base_dim=3),
    "small": Preset(num_layers=4, num_attention_heads=4, attention_head_dim=32, ffn_dim=512, text_dim=64,
                    text_layers=2, text_heads=4, text_ff=128, vae_base_dim=8),
    # Wan 2.2's two experts at the tiny sizes (diffusers' test_wan_22.py: boundary_ratio 0.875): with shift 3 the
    # timesteps of 4 steps are 1000, 857.7, 602.2, 8.9, so step 0 runs transformer and steps 1-3 transformer_2
    "tiny22": Preset(num_layers=2, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, text_dim=32,
                     text_layers=2, text_heads=2, text_ff=64, vae_base_dim=3, boundary_ratio=0.875),
}

LATENT_CHANNELS = 16
TEMPORAL_DOWNSAMPLE = (False, True, True)  # 8x spatial, 4x temporal
T5_WORDS = ("the", "of", "and", "cat", "dog", "video", "walking", "in", "on", "with")  # word starts of the T5 vocabulary
ROPE_MAX_SEQ_LEN = 128  # latent frames / token rows / token columns a tiny model places (diffusers' test: 32)


def _text_encoder(p: Preset, tok):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=len(tok), d_model=p.text_dim, d_kv=p.text_dim // p.text_heads, d_ff=p.text_ff,
                     num_layers=p.text_layers, num_heads=p.text_heads, relative_attention_num_buckets=8,
                     relative_attention_max_distance=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                     use_cache=False, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                     eos_token_id=tok.eos_token_id, decoder_start_token_id=0)
    return UMT5EncoderModel(cfg).eval()


def _transformer(p: Preset):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=p.num_attention_heads, attention_head_dim=p.attention_head_dim,
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=p.text_dim, freq_dim=256,
        ffn_dim=p.ffn_dim, num_layers=p.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=ROPE_MAX_SEQ_LEN,
    ).eval()


def _vae(p: Preset):
    from diffusers import AutoencoderKLWan

    mean, std = tiny_common.random_latent_stats(LATENT_CHANNELS)
    return AutoencoderKLWan(base_dim=p.vae_base_dim, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=list(TEMPORAL_DOWNSAMPLE),
                            latents_mean=mean, latents_std=std).eval()


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def make_tiny_wan(path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a Wan 2.1 diffusers model directory at ``path`` and return it; weights are a function of
    ``(preset, seed)`` only (the caller's global RNG state is left as it was)."""
    p = tiny_common.check_preset(PRESETS, preset, "wan")
    from diffusers import WanPipeline

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_common.t5_unigram_tokenizer(T5_WORDS)
    with tiny_common.seeded(seed):
        transformer = _transformer(p)
        # diffusers initialises the modulation tables with randn; the output head's weights are random too
        vae = _vae(p)
        text_encoder = _text_encoder(p, tok)
        transformer_2 = _transformer(p) if p.boundary_ratio is not None else None  # other random weights
    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=_scheduler(),
                       transformer=transformer, transformer_2=transformer_2, boundary_ratio=p.boundary_ratio)
    pipe.save_pretrained(out, safe_serialization=True)
    tiny_common.update_model_index(out / "model_index.json", tokenizer=["transformers", "T5TokenizerFast"])
    logger.info("wrote wan %s model (seed %d) to %s", preset, seed, out)
    return out
