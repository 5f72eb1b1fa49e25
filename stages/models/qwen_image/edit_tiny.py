"""The embedded tiny Qwen-Image-Edit models (``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline``): the tiny
Qwen-Image model of ``qwen_image/tiny.py`` with what the edit pipelines add and three gains on its weights.

What is added:

- the tokenizer also has every word of the edit template's system turn as one token (as Qwen2's real vocabulary
  has), so the template's prefix is exactly the 64 tokens the pipelines drop (``prompt_template_encode_start_idx``);
- ``processor/``: ``Qwen2VLProcessor``'s parts, its image processor (``preprocessor_config.json``: Qwen2-VL's
  14-pixel patches merged 2x2, at most :data:`MAX_PIXELS` pixels per image so the tiny vision tower sees a few
  dozen patches) and its tokenizer (the same as ``tokenizer/``);
- ``model_index.json``: the pipeline class and ``processor = ["transformers", "Qwen2VLProcessor"]``.

The gains (with the tiny Qwen-Image weights as they are, the input image moves a pixel of the output by less than a
level, so no test could tell a wrong condition from a right one): the VAE's ``quant_conv`` mean channels by
:data:`ENCODER_GAIN` (the encoded image gets the spread of the noise latents, as a trained VAE's latents have), the
transformer's q/k RMSNorm weights by :data:`ATTENTION_GAIN` (attention sharp enough to pick out the condition tokens)
and the vision tower's merger output by :data:`VISION_GAIN` (the image tokens' hidden states weigh in the text
encoder's output as much as the words'). The VAE decoder and everything else stay the tiny Qwen-Image model's.

From the shell: ``python tools/make_tiny_model.py OUT_DIR --family qwen_image_edit|qwen_image_edit_plus``.
"""

from __future__ import annotations

import json
from pathlib import Path

from omni_runtime.stages.models.qwen_image.edit_text import SYSTEM_PREFIX
from omni_runtime.stages.models.qwen_image.tiny import _tokenizer, make_tiny_qwen_image
from omni_runtime.stages.models.tiny_common import update_model_index, write_bpe_vocab_files
from omni_runtime.stages.weights import DIFFUSERS_WEIGHTS, MODEL_INDEX

ENCODER_GAIN = 16.0
ATTENTION_GAIN = 6.0
VISION_GAIN = 8.0
PATCH, MERGE, TEMPORAL_PATCH = 14, 2, 2
MIN_PIXELS = (PATCH * MERGE) ** 2 * 4    # at least 4 merged vision tokens per image
MAX_PIXELS = (PATCH * MERGE) ** 2 * 16   # at most 16 merged vision tokens per image (the real one: 16384)
PROCESSOR_SLOT = "processor"


def template_words() -> tuple[str, ...]:
    """The pieces Qwen2's pre-tokenizer cuts the edit template's system turn into (each becomes one token)."""
    tok, _, _ = _tokenizer()
    words: list[str] = []
    for part in SYSTEM_PREFIX.split("<|im_start|>"):
        for text in part.split("<|im_end|>"):
            pieces = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
            words.extend(text[a:b] for _, (a, b) in pieces if b - a > 1)
    # the words with a leading space first: their merges ("Ġc") must outrank those inside other words ("co" of
    # "color"), or BPE would cut " consistency" at the space
    return tuple(sorted(dict.fromkeys(words), key=lambda w: not w.startswith(" ")))


def _scale(path: Path, gains: dict[str, tuple[float, int | None]]) -> None:
    """Multiply the tensors whose name's last-but-one part is a key of ``gains`` by its gain (the first ``rows``
    rows only when rows is not None)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(path)
    for key in sd:
        parts = key.rsplit(".", 2)
        stem = parts[-2] if len(parts) > 1 else ""
        for name, (gain, rows) in gains.items():
            if stem == name or key.startswith(name + "."):
                if rows is None:
                    sd[key] *= gain
                else:
                    sd[key][:rows] *= gain
    save_file(sd, path, metadata={"format": "pt"})


def make_tiny_qwen_image_edit(path: str | Path, pipeline: str, preset: str = "tiny", seed: int = 0) -> Path:
    """Write the tiny ``pipeline`` (``QwenImageEditPipeline`` or ``QwenImageEditPlusPipeline``) model at ``path``."""
    from transformers import Qwen2VLImageProcessor

    words = template_words()
    out = make_tiny_qwen_image(path, preset=preset, seed=seed, extra_words=words)
    tok, vocab, merges = _tokenizer(words)
    prefix = len(tok(SYSTEM_PREFIX).input_ids)
    if prefix != 64:
        raise AssertionError(f"tiny edit tokenizer: the template prefix is {prefix} tokens; the pipelines drop 64")
    processor_dir = out / PROCESSOR_SLOT
    Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, merge_size=MERGE,
                          temporal_patch_size=TEMPORAL_PATCH).save_pretrained(str(processor_dir))
    tok.save_pretrained(str(processor_dir))
    write_bpe_vocab_files(processor_dir, vocab, merges)
    z_dim = json.loads((out / "vae" / "config.json").read_text())["z_dim"]
    _scale(out / "vae" / f"{DIFFUSERS_WEIGHTS}.safetensors", {"quant_conv": (ENCODER_GAIN, z_dim)})
    _scale(out / "transformer" / f"{DIFFUSERS_WEIGHTS}.safetensors",
           {n: (ATTENTION_GAIN, None) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")})
    encoder = next((out / "text_encoder").glob("*.safetensors"))
    _scale(encoder, {"visual.merger.mlp.2": (VISION_GAIN, None), "model.visual.merger.mlp.2": (VISION_GAIN, None)})
    update_model_index(out / MODEL_INDEX, _class_name=pipeline, **{PROCESSOR_SLOT: ["transformers", "Qwen2VLProcessor"]})
    return out
