"""Qwen-Image text encoding: Qwen2.5-VL's last hidden states of the prompt in the pipeline's chat template, as
``QwenImagePipeline.encode_prompt`` computes them, one unpadded ``(tokens, hidden)`` tensor per prompt.

The pipeline wraps each prompt in a chat template whose system turn describes the task, runs the tokens through
the language model of ``Qwen2_5_VLForConditionalGeneration`` (the vision tower never runs: prompts are text),
takes the last hidden state of every real (unpadded) token and drops the template's first 34 tokens (its system
turn and the user turn's header), so what remains is the prompt and the template's closing tokens.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
import transformers

from omni_runtime.parallel.hsdp import HSDPInferenceConfig, ShardCondition, block_list_condition
from omni_runtime.stages.device import resolve_device, resolve_dtype
from omni_runtime.stages.errors import CheckpointError, RequestError
from omni_runtime.stages.models.text_common import check_prompts, load_encoder
from omni_runtime.stages.text_encoder import _load_component
from omni_runtime.stages.weights import MODEL_INDEX, component_dir, read_model_index

logger = logging.getLogger(__name__)

# These mirror diffusers' QwenImagePipeline, which sets them in __init__ (not as class attributes): its
# prompt_template_encode, prompt_template_encode_start_idx and tokenizer_max_length.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_START_IDX = 34  # tokens of the template before the prompt, dropped from the embeddings
TOKENIZER_MAX_LENGTH = 1024  # the pipeline tokenizes at most this many tokens after the dropped ones
MAX_SEQUENCE_LENGTH = 1024  # encode_prompt's limit on max_sequence_length (its check_inputs)
DEFAULT_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s max_sequence_length default: what serving uses

TEXT_ENCODER_SLOT = "text_encoder"
TEXT_ENCODER_CLASS = "Qwen2_5_VLForConditionalGeneration"


def _exact_module(*names: str) -> ShardCondition:
    """A condition matching the submodules with exactly these qualified names."""
    wanted = frozenset(names)

    def condition(name: str, module: torch.nn.Module) -> bool:
        return name in wanted

    condition.__name__ = f"modules({', '.join(names)})"
    return condition


# HSDP units of Qwen2_5_VLForConditionalGeneration (transformers 5 module paths): each decoder layer of the
# language model; the vision tower is one unit of its own, so the forward (text only, the tower never runs)
# never all-gathers its weights. Embeddings, the final norm and lm_head stay in the root unit.
HSDP_SHARD_CONDITIONS: list[ShardCondition] = [
    block_list_condition("model.language_model.layers"),
    _exact_module("model.visual"),
]
# Where checkpoints keep those parameters: transformers 5 builds the module tree above but saves (and Qwen-Image's
# text_encoder ships) the older layout, ``model.layers.*`` / ``model.embed_tokens`` / ``model.norm`` and
# ``visual.*`` (module prefix -> checkpoint prefix; a checkpoint in the module layout is read as is).
CHECKPOINT_RENAMES: tuple[tuple[str, str], ...] = (("model.language_model.", "model."), ("model.visual.", "visual."))


def check_text_encoder_class(model_dir: str | Path, library: str, cls_name: str) -> None:
    """Raise ``CheckpointError`` unless model_index.json's ``text_encoder`` is Qwen2.5-VL of transformers."""
    if library != "transformers" or cls_name != TEXT_ENCODER_CLASS or not hasattr(transformers, cls_name):
        raise CheckpointError(f"{Path(model_dir) / MODEL_INDEX}: {TEXT_ENCODER_SLOT} = [{library!r}, {cls_name!r}] "
                              f"is not supported; allowed: transformers [{TEXT_ENCODER_CLASS!r}]")


def _load_text_encoder(path: str | Path, index: dict[str, tuple[str, str]], dtype: torch.dtype,
                       device: torch.device, hsdp: HSDPInferenceConfig | None) -> torch.nn.Module:
    """The text encoder of ``index``'s class, whole or (``hsdp`` with shard degree > 1) straight into its shards."""
    directory = component_dir(path, TEXT_ENCODER_SLOT)
    library, cls_name = index[TEXT_ENCODER_SLOT]
    check_text_encoder_class(path, library, cls_name)
    return load_encoder(directory, cls_name, dtype, device, hsdp, HSDP_SHARD_CONDITIONS, CHECKPOINT_RENAMES)


class QwenImageTextEncoder:
    """Encodes prompts for a Qwen-Image denoiser: ``encode(prompts)`` gives, per prompt, ``{"prompt_embeds":
    (tokens, hidden)}``, the unpadded rows ``QwenImagePipeline.encode_prompt`` returns for that prompt alone."""

    sees_images = False  # the text alone (``stages.models.family.TextEncoder``)

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        # Only the hidden states are used: ask for the logits of one token instead of every token's (the LM head
        # of the real model is 152k wide). Older transformers name the argument differently or lack it.
        params = inspect.signature(type(text_encoder).forward).parameters
        self._forward_kwargs: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "float32",
                        device: str | torch.device = "cpu", hsdp: HSDPInferenceConfig | None = None
                        ) -> QwenImageTextEncoder:
        """Load ``tokenizer`` and ``text_encoder`` (Qwen2.5-VL) from a Qwen-Image model directory.

        With ``hsdp`` (shard degree > 1) the encoder is sharded over its mesh, each rank loading only its rows
        (collective: every rank of the mesh calls this)."""
        torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
        index = read_model_index(path)
        tok = _load_component(path, index, "tokenizer")
        enc = _load_text_encoder(path, index, torch_dtype, dev, hsdp)
        logger.info("loaded the Qwen-Image text encoder from %s (%s on %s)", path, torch_dtype, dev)
        return cls(tok, enc.to(dev).eval(), dev)

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int = DEFAULT_SEQUENCE_LENGTH
               ) -> list[dict[str, torch.Tensor]]:
        """Encode a batch of prompts in one forward; one ``{"prompt_embeds": (tokens, hidden)}`` per prompt, at
        most ``max_sequence_length`` tokens each."""
        check_prompts(prompts)
        if (isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int)
                or not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH):
            raise RequestError(f"max_sequence_length={max_sequence_length!r} is not allowed; it must be an "
                               f"integer from 1 to {MAX_SEQUENCE_LENGTH}")
        drop = PROMPT_TEMPLATE_START_IDX
        # Padded on the right whatever the tokenizer's default: the encoder is causal and numbers positions from 0,
        # so each row's real tokens see exactly what they see when that prompt is encoded alone.
        tokens = self.tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + drop,
                                padding=True, truncation=True, padding_side="right", return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        out = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                **self._forward_kwargs)
        hidden = out.hidden_states[-1].to(dtype=self.text_encoder.dtype)
        keep = mask.bool()
        return [{"prompt_embeds": hidden[i][keep[i]][drop:][:max_sequence_length]} for i in range(len(prompts))]

    __call__ = encode
