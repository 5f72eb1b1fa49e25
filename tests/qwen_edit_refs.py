"""diffusers' Qwen-Image-Edit pipelines on an embedded tiny model, as the served edits' reference.

``Qwen2VLProcessor.from_pretrained`` needs torchvision (transformers builds the processor's video processor with
it), which this project does not install; the reference pipeline gets the processor transformers' own class
assembles from the checkpoint's ``processor/`` parts (its tokenizer and image processor, loaded by transformers'
auto classes as the processor loads them), so its ``__call__`` (the template's image tokens, the pixel values) is
transformers' code, not ours.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np


def processor(directory: Path) -> Any:
    """``Qwen2VLProcessor`` of ``directory`` without its video processor (images only)."""
    import transformers

    p = transformers.Qwen2VLProcessor.__new__(transformers.Qwen2VLProcessor)
    p.tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    p.image_processor = transformers.AutoImageProcessor.from_pretrained(str(directory), local_files_only=True)
    p.image_token, p.video_token = "<|image_pad|>", "<|video_pad|>"
    p.image_token_id = p.tokenizer.convert_tokens_to_ids(p.image_token)
    p.video_token_id = p.tokenizer.convert_tokens_to_ids(p.video_token)
    p.chat_template = None
    return p


def pipeline(model_dir: Path) -> Any:
    """The diffusers pipeline ``model_index.json`` names (QwenImageEditPipeline or QwenImageEditPlusPipeline)."""
    import diffusers
    import torch

    from omni_runtime.stages.weights import read_json

    cls = getattr(diffusers, read_json(model_dir / "model_index.json")["_class_name"])
    pipe = cls.from_pretrained(str(model_dir), processor=processor(model_dir / "processor"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edit(pipe: Any, images: list[bytes], prompt: str, size: str, seed: int, **kw: Any) -> np.ndarray:
    """``pipe(image=..., prompt, width, height, generator=seed, **kw)`` as (H, W, 3) uint8."""
    import torch
    from PIL import Image

    pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    w, h = (int(v) for v in size.split("x"))
    image = pictures if len(pictures) > 1 else pictures[0]
    out = pipe(image=image, prompt=prompt, width=w, height=h, generator=torch.Generator("cpu").manual_seed(seed),
               **kw).images[0]
    return np.asarray(out)

