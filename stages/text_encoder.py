"""Text encoder stage: CLIP pooled embedding + T5 sequence embeddings, as FluxPipeline.encode_prompt computes them."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import transformers

from omni_runtime.parallel.hsdp import HSDPInferenceConfig, ShardCondition, block_list_condition
from omni_runtime.stages.device import resolve_device, resolve_dtype
from omni_runtime.stages.errors import CheckpointError, RequestError
from omni_runtime.stages.weights import component_dir, read_model_index

logger = logging.getLogger(__name__)

MAX_T5_SEQUENCE_LENGTH = 512


# What each model component of a FLUX.1 directory may be (the class named in model_index.json).
ALLOWED_CLASSES: dict[str, tuple[str, ...]] = {
    "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("T5EncoderModel",),
}
# The tokenizer slots take any tokenizer class transformers knows (CLIPTokenizer, T5TokenizerFast, a generic
# PreTrainedTokenizerFast / TokenizersBackend as diffusers saves it, ...): they load through AutoTokenizer.
TOKENIZER_SLOTS = ("tokenizer", "tokenizer_2")


def check_tokenizer_class(where: str, library: str, cls_name: str) -> None:
    """Raise ``CheckpointError`` (prefixed ``where``) unless ``cls_name`` is a tokenizer class of transformers."""
    cls = getattr(transformers, cls_name, None) if library == "transformers" else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        raise CheckpointError(f"{where} is not supported; allowed: a tokenizer class of transformers "
                              f"{transformers.__version__} (e.g. CLIPTokenizer, T5TokenizerFast, "
                              f"PreTrainedTokenizerFast)")


def check_component_class(model_dir: str | Path, name: str, library: str, cls_name: str) -> None:
    """Raise ``CheckpointError`` unless ``[library, cls_name]`` from model_index.json can fill slot ``name``."""
    where = f"{Path(model_dir) / 'model_index.json'}: {name} = [{library!r}, {cls_name!r}]"
    if name in TOKENIZER_SLOTS:
        check_tokenizer_class(where, library, cls_name)
        return
    allowed = ALLOWED_CLASSES[name]
    if library != "transformers" or cls_name not in allowed or not hasattr(transformers, cls_name):
        raise CheckpointError(f"{where} is not supported; allowed: transformers {list(allowed)}")


# HSDP units of the text encoders (the ``_hsdp_shard_conditions`` of classes we do not own): each CLIP encoder
# layer and each T5 block; embeddings and final norms stay in the root unit. ``text_model.`` is the prefix of
# checkpoints written by transformers 4.
HSDP_SHARD_CONDITIONS: dict[str, list[ShardCondition]] = {
    "CLIPTextModel": [block_list_condition("encoder.layers", "text_model.encoder.layers")],
    "T5EncoderModel": [block_list_condition("encoder.block")],
}
_CHECKPOINT_PREFIXES: dict[str, tuple[str, ...]] = {"CLIPTextModel": ("text_model.",)}


def _load_sharded(cls: Any, directory: Path, dtype: torch.dtype, device: torch.device,
                  hsdp: HSDPInferenceConfig) -> torch.nn.Module:
    """Build ``cls`` from its config with parameters on meta, shard it and read only this rank's rows."""
    from omni_runtime.stages.sharded_load import build_sharded_model
    from omni_runtime.stages.weights import TRANSFORMERS_WEIGHTS

    config = cls.config_class.from_pretrained(str(directory), local_files_only=True)
    cfg = dataclasses.replace(hsdp, shard_conditions=HSDP_SHARD_CONDITIONS[cls.__name__])
    return build_sharded_model(lambda: cls(config), directory, TRANSFORMERS_WEIGHTS, cfg, device=device,
                               dtype=dtype, key_prefixes=_CHECKPOINT_PREFIXES.get(cls.__name__, ()))


def _load_component(path: str | Path, index: dict[str, tuple[str, str]], name: str,
                    hsdp: HSDPInferenceConfig | None = None, **kwargs: Any) -> Any:
    """Load one transformers component with the class ``model_index.json`` names, which must fit the slot.

    With ``hsdp`` (shard degree > 1) a text encoder is loaded straight into its FSDP2 shards."""
    directory = component_dir(path, name)
    library, cls_name = index[name]
    check_component_class(path, name, library, cls_name)
    loader = transformers.AutoTokenizer if name in TOKENIZER_SLOTS else getattr(transformers, cls_name)
    try:
        if hsdp is not None and hsdp.enabled and cls_name in HSDP_SHARD_CONDITIONS:
            return _load_sharded(loader, directory, kwargs["dtype"], kwargs["device"], hsdp)
        kwargs.pop("device", None)
        return loader.from_pretrained(str(directory), local_files_only=True, **kwargs)
    except CheckpointError:
        raise
    except Exception as e:  # anything a damaged checkpoint makes the loader raise (SafetensorError, ...)
        raise CheckpointError(f"{directory}: cannot load {cls_name}: {e}") from e


class TextEncoderStage:
    """Encodes prompts for a Flux denoiser.

    ``encode(prompts)`` returns ``prompt_embeds`` (B, max_sequence_length, d_t5) from T5,
    ``pooled_prompt_embeds`` (B, d_clip) from CLIP's pooled output (CLIP truncates at 77 tokens), and
    ``text_ids`` (max_sequence_length, 3) zeros, exactly as ``FluxPipeline.encode_prompt`` computes them.
    """

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, tokenizer_2: Any,
                 text_encoder_2: torch.nn.Module, device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.device = device
        self.tokenizer_max_length = getattr(tokenizer, "model_max_length", 77) or 77

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", mesh: Any = None,
                        hsdp: HSDPInferenceConfig | None = None) -> TextEncoderStage:
        """Load ``tokenizer``/``text_encoder`` (CLIP) and ``tokenizer_2``/``text_encoder_2`` (T5) from a model dir.

        ``mesh`` is accepted for a uniform loader signature (the encoders need no group of their own). With ``hsdp``
        (shard degree > 1) both encoders are sharded over its mesh, each rank loading only its rows (collective:
        every rank of the mesh calls this)."""
        torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
        index = read_model_index(path)
        tok = _load_component(path, index, "tokenizer")
        enc = _load_component(path, index, "text_encoder", hsdp, dtype=torch_dtype, device=dev)
        tok2 = _load_component(path, index, "tokenizer_2")
        enc2 = _load_component(path, index, "text_encoder_2", hsdp, dtype=torch_dtype, device=dev)
        logger.info("loaded text encoders from %s (%s on %s)", path, torch_dtype, dev)
        return cls(tok, enc.to(dev).eval(), tok2, enc2.to(dev).eval(), dev)

    def _clip_pooled(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer_max_length, truncation=True,
                             return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
        out = self.text_encoder(ids.to(self.device), output_hidden_states=False)
        return out.pooler_output.to(dtype=self.text_encoder.dtype, device=self.device)

    def _t5_sequence(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        ids = self.tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                               return_length=False, return_overflowing_tokens=False, return_tensors="pt").input_ids
        out = self.text_encoder_2(ids.to(self.device), output_hidden_states=False)[0]
        return out.to(dtype=self.text_encoder_2.dtype, device=self.device)

    @torch.no_grad()
    def encode(self, prompts: str | list[str], max_sequence_length: int = MAX_T5_SEQUENCE_LENGTH
               ) -> dict[str, torch.Tensor]:
        """Encode a batch of prompts (one forward per encoder for the whole batch)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(f"prompt={prompts!r} is not allowed; a prompt is a string or a non-empty list "
                               f"of strings")
        if (isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int)
                or not 1 <= max_sequence_length <= MAX_T5_SEQUENCE_LENGTH):
            raise RequestError(f"max_sequence_length={max_sequence_length!r} is not allowed; it must be an "
                               f"integer from 1 to {MAX_T5_SEQUENCE_LENGTH}")
        pooled = self._clip_pooled(prompts)
        embeds = self._t5_sequence(prompts, max_sequence_length)
        text_ids = torch.zeros(embeds.shape[1], 3).to(device=self.device, dtype=self.text_encoder.dtype)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids}

    __call__ = encode
