"""Write a complete diffusers-format Qwen-Image model directory with deterministic random weights.

The Qwen-Image counterpart of :mod:`omni_runtime.stages.models.flux.tiny` (the FLUX maker): no machine of this project
can download weights, so tests and benchmarks use what this writes. The result loads with diffusers' own
``QwenImagePipeline.from_pretrained(dir)``:

    model_index.json
    transformer/    QwenImageTransformer2DModel        (config.json + diffusion_pytorch_model.safetensors)
    vae/            AutoencoderKLQwenImage             (16 latent channels, downsamples by 8, seeded latent stats)
    text_encoder/   Qwen2_5_VLForConditionalGeneration (tiny language model + a one-block vision tower)
    tokenizer/      Qwen2Tokenizer                     (byte-level BPE built here, Qwen2's special tokens)
    scheduler/      FlowMatchEulerDiscreteScheduler    (Qwen-Image's config: exponential dynamic shift)

The tokenizer's merges make every word of the pipeline's prompt template one token, as Qwen2's real vocabulary
does, so the template's system prefix is exactly the 34 tokens the pipeline drops
(``prompt_template_encode_start_idx``) and the embeddings that remain are those of the user's prompt.

From the shell: ``python tools/make_tiny_model.py OUT_DIR --family qwen_image [--preset tiny|small] [--seed N]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omni_runtime.stages.models import tiny_common
from omni_runtime.stages.models.byte_bpe import bytes_to_unicode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset(tiny_common.TransformerSizes):
    """Sizes of every component; ``tiny`` is for tests, ``small`` makes compute dominate for benchmarks."""

    # transformer (and the block count and heads of ``TransformerSizes``)
    axes_dims_rope: tuple[int, int, int]
    # text encoder (the language model of Qwen2.5-VL; its hidden size is the transformer's joint_attention_dim)
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    mrope_section: tuple[int, int, int]
    # the text encoder's vision tower (never run by the pipeline, present because the class has one)
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    # vae
    vae_base_dim: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        num_layers=2, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
        text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1, text_intermediate=64, mrope_section=(2, 3, 3),
        vision_hidden=16, vision_depth=1, vision_heads=2,
        vae_base_dim=4,
    ),
    "small": Preset(
        num_layers=4, num_attention_heads=6, attention_head_dim=64, axes_dims_rope=(16, 24, 24),
        text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=256,
        mrope_section=(4, 6, 6),
        vision_hidden=32, vision_depth=1, vision_heads=2,
        vae_base_dim=8,
    ),
}

LATENT_CHANNELS = 16
# Three downsampling levels: the pipeline's spatial scale factor is 2 ** len(TEMPORAL_DOWNSAMPLE) = 8.
TEMPORAL_DOWNSAMPLE = (False, True, True)
VAE_DIM_MULT = (1, 2, 4, 4)  # one more level than TEMPORAL_DOWNSAMPLE, as the encoder / decoder expect

# Qwen2's special tokens (the ones Qwen-Image's template and Qwen2.5-VL's config use), in Qwen2's order.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                  "<|video_pad|>")
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
TOKENIZER_MAX_LENGTH = 32768  # Qwen2's model_max_length; the pipeline truncates at 1024 + 34 itself

# Whole-word tokens of the tiny vocabulary (Qwen2's pre-tokenizer keeps a word's leading space, shown as "Ġ"):
# every word of QwenImagePipeline's prompt template, and a few common prompt words.
_TEMPLATE_WORDS = (
    "system", "Describe", " the", " image", " by", " detailing", " color", " shape", " size", " texture",
    " quantity", " text", " spatial", " relationships", " of", " objects", " and", " background", "user",
    "assistant",
)
_PROMPT_WORDS = (" a", " photo", " cat", " dog", " red", " in", " on", " with")


def _qwen2_vocab(extra_words: tuple[str, ...] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny byte-level BPE: every byte, then the merges (and their tokens) that build each whole word (and each
    of ``extra_words``) from its first byte left to right, then the special tokens. Returns ``(vocab, merges)``."""
    byte_chars = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for ch in byte_chars.values():
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in (*extra_words, *_TEMPLATE_WORDS, *_PROMPT_WORDS):  # extra first: their merges rank first
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        built = symbols[0]
        for nxt in symbols[1:]:
            merged = built + nxt
            if merged not in vocab:  # a prefix another word built already ("Ġt" of " the" and " text")
                vocab[merged] = len(vocab)
                merges.append((built, nxt))
            built = merged
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    return vocab, merges


def _tokenizer(extra_words: tuple[str, ...] = ()):
    """A ``Qwen2Tokenizer`` over :func:`_qwen2_vocab` with Qwen2's special tokens (``<|endoftext|>`` also pads)."""
    from transformers import AddedToken, Qwen2Tokenizer

    vocab, merges = _qwen2_vocab(extra_words)
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=None, eos_token=ENDOFTEXT,
                         pad_token=ENDOFTEXT, model_max_length=TOKENIZER_MAX_LENGTH, clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS[1:]]})
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != [vocab[s] for s in SPECIAL_TOKENS] or len(tok) != len(vocab):
        raise AssertionError(f"tiny Qwen2 tokenizer: special tokens got ids {ids}, expected the vocabulary's "
                             f"{[vocab[s] for s in SPECIAL_TOKENS]} ({len(tok)} tokens, vocabulary {len(vocab)})")
    return tok, vocab, merges


def _text_encoder(p: Preset, tok, vocab: dict[str, int]):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = p.text_hidden // p.text_heads
    assert sum(p.mrope_section) * 2 == head_dim, (p.mrope_section, head_dim)
    vocab_size = -(-len(tok) // 64) * 64  # rounded up, as real checkpoints pad their embedding tables
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=p.text_hidden, intermediate_size=p.text_intermediate,
            num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads,
            num_key_value_heads=p.text_kv_heads, max_position_embeddings=2048, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                             "mrope_section": list(p.mrope_section)},
            bos_token_id=vocab[ENDOFTEXT], eos_token_id=vocab[IM_END], pad_token_id=vocab[ENDOFTEXT],
            use_cache=False,
        ),
        vision_config=dict(
            depth=p.vision_depth, hidden_size=p.vision_hidden, intermediate_size=2 * p.vision_hidden,
            num_heads=p.vision_heads, out_hidden_size=p.text_hidden, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=[p.vision_depth - 1],
        ),
        image_token_id=vocab[IMAGE_PAD], video_token_id=vocab[VIDEO_PAD],
        vision_start_token_id=vocab[VISION_START], vision_end_token_id=vocab[VISION_END],
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _transformer(p: Preset):
    from diffusers import QwenImageTransformer2DModel

    assert sum(p.axes_dims_rope) == p.attention_head_dim, (p.axes_dims_rope, p.attention_head_dim)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=p.num_layers,
        attention_head_dim=p.attention_head_dim, num_attention_heads=p.num_attention_heads,
        joint_attention_dim=p.text_hidden, axes_dims_rope=p.axes_dims_rope,
    ).eval()


def _vae(p: Preset):
    from diffusers import AutoencoderKLQwenImage

    mean, std = tiny_common.random_latent_stats(LATENT_CHANNELS)
    return AutoencoderKLQwenImage(
        base_dim=p.vae_base_dim, z_dim=LATENT_CHANNELS, dim_mult=list(VAE_DIM_MULT), num_res_blocks=1,
        attn_scales=[], temperal_downsample=list(TEMPORAL_DOWNSAMPLE), dropout=0.0,
        latents_mean=mean, latents_std=std,
    ).eval()


def _scheduler():
    """Qwen-Image's scheduler config (its scheduler/scheduler_config.json)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
        invert_sigmas=False, stochastic_sampling=False, use_karras_sigmas=False, use_exponential_sigmas=False,
        use_beta_sigmas=False,
    )


def make_tiny_qwen_image(path: str | Path, preset: str = "tiny", seed: int = 0,
                         extra_words: tuple[str, ...] = ()) -> Path:
    """Write a Qwen-Image diffusers model directory at ``path`` and return it.

    Weights are a function of ``(preset, seed)`` only; the caller's global RNG state is left as it was.
    ``preset`` is one of ``PRESETS`` (``tiny``, ``small``); ``extra_words`` are more whole-word tokens (the edit
    pipelines' template, ``qwen_image/edit_tiny.py``).
    """
    p = tiny_common.check_preset(PRESETS, preset, "qwen_image")
    from diffusers import QwenImagePipeline

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok, vocab, merges = _tokenizer(extra_words)
    with tiny_common.seeded(seed):  # the caller's global RNG state is left as it was
        transformer = _transformer(p)
        vae = _vae(p)
        text_encoder = _text_encoder(p, tok, vocab)
    pipe = QwenImagePipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tok,
                             transformer=transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    # the tokenizer as Qwen-Image checkpoints name it, whatever alias the installed transformers saved
    tiny_common.update_model_index(out / "model_index.json", tokenizer=["transformers", "Qwen2Tokenizer"])
    tiny_common.write_bpe_vocab_files(out / "tokenizer", vocab, merges)
    logger.info("wrote qwen_image %s model (seed %d) to %s", preset, seed, out)
    return out
