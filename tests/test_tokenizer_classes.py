"""The tokenizer slots accept any tokenizer class transformers loads through AutoTokenizer (diffusers saves generic
fast tokenizers as ``PreTrainedTokenizerFast``); a class transformers does not know stays a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.model_check import check_model_dir
from omni_runtime.stages.text_encoder import TextEncoderStage

PROMPTS = ["a red fox in the snow", "x"]


def _set_class(model: Path, slot: str, cls: str) -> None:
    index = json.loads((model / "model_index.json").read_text())
    index[slot] = ["transformers", cls]
    (model / "model_index.json").write_text(json.dumps(index))


def _save_generic(model: Path, slot: str) -> None:
    """Re-save ``slot``'s tokenizer as a generic PreTrainedTokenizerFast (its tokenizer.json, its special tokens)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(model / slot), local_files_only=True)
    generic = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, model_max_length=tok.model_max_length,
        **{k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)})
    shutil.rmtree(model / slot)
    generic.save_pretrained(str(model / slot))
    _set_class(model, slot, "PreTrainedTokenizerFast")


@pytest.fixture()
def model(tiny_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def test_generic_fast_tokenizers_load_and_encode_the_same(model, tiny_dir):
    ref = TextEncoderStage.from_pretrained(tiny_dir).encode(PROMPTS)
    for slot in ("tokenizer", "tokenizer_2"):
        _save_generic(model, slot)
    assert "tokenizer_2: PreTrainedTokenizerFast" in check_model_dir(model)
    stage = TextEncoderStage.from_pretrained(model)
    assert type(stage.tokenizer_2).__name__ not in ("T5Tokenizer", "T5TokenizerFast")  # really the generic one
    got = stage.encode(PROMPTS)
    for key in ("prompt_embeds", "pooled_prompt_embeds", "text_ids"):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)


@pytest.mark.parametrize("cls, says", [
    ("NoSuchTokenizer", "tokenizer_2 = ['transformers', 'NoSuchTokenizer'] is not supported; allowed: a tokenizer "
                        "class of transformers"),
    ("CLIPTextModel", "tokenizer_2 = ['transformers', 'CLIPTextModel'] is not supported"),  # a model, not one
])
def test_a_class_transformers_does_not_know_is_a_clear_error(model, cls, says):
    _set_class(model, "tokenizer_2", cls)
    with pytest.raises(CheckpointError) as e:
        TextEncoderStage.from_pretrained(model)
    assert says in str(e.value)
