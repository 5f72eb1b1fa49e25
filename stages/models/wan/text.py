"""Wan text encoding: UMT5's last hidden states of the cleaned prompt, as ``WanPipeline._get_t5_prompt_embeds``
computes them: tokens padded to ``max_sequence_length`` (512, the pipeline's default), the real tokens' states kept
and the rest set to zeros, one ``(512, d_model)`` tensor per prompt (the transformer cross-attends to all of them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers

from omni_runtime.parallel.hsdp import HSDPInferenceConfig, block_list_condition
from omni_runtime.stages.device import resolve_device, resolve_dtype
from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.models.text_common import check_prompts, load_encoder
from omni_runtime.stages.weights import MODEL_INDEX, component_dir, read_model_index

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s max_sequence_length default: what serving uses
TEXT_ENCODER_CLASSES = ("UMT5EncoderModel", "T5EncoderModel")


def prompt_clean(text: str) -> str:
    """The pipeline's own prompt cleaning (ftfy when installed, HTML unescaping, white space)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as clean

    return clean(text)


def _load_encoder(path: Path, index: dict[str, tuple[str, str]], dtype: torch.dtype, device: torch.device,
                  hsdp: HSDPInferenceConfig | None) -> torch.nn.Module:
    directory = component_dir(path, "text_encoder")
    library, cls_name = index["text_encoder"]
    if library != "transformers" or cls_name not in TEXT_ENCODER_CLASSES:
        raise CheckpointError(f"{path / MODEL_INDEX}: text_encoder = [{library!r}, {cls_name!r}] is not supported; "
                              f"allowed: transformers {list(TEXT_ENCODER_CLASSES)}")
    return load_encoder(directory, cls_name, dtype, device, hsdp, [block_list_condition("encoder.block")])


class WanTextEncoder:
    """``encode(prompts)`` gives, per prompt, ``{"prompt_embeds": (512, d_model)}``: what ``WanPipeline``'s
    ``encode_prompt`` returns for that prompt alone (padding is to a fixed length, so a batch changes nothing)."""

    sees_images = False  # the text alone (``stages.models.family.TextEncoder``)

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", hsdp: HSDPInferenceConfig | None = None
                        ) -> WanTextEncoder:
        torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
        path = Path(path)
        index = read_model_index(path)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(component_dir(path, "tokenizer")),
                                                             local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}/tokenizer: cannot load the tokenizer: {e}") from e
        enc = _load_encoder(path, index, torch_dtype, dev, hsdp)
        logger.info("loaded the Wan text encoder from %s (%s on %s)", path, torch_dtype, dev)
        return cls(tok, enc.to(dev).eval(), dev)

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH
               ) -> list[dict[str, torch.Tensor]]:
        check_prompts(prompts)
        tokens = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                                max_length=max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, mask).last_hidden_state
        lens = mask.gt(0).sum(dim=1).tolist()
        out = []
        for i, n in enumerate(lens):
            row = hidden[i].clone()
            row[n:] = 0
            out.append({"prompt_embeds": row})
        return out

    __call__ = encode
