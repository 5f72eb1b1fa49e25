"""What every family's tiny model maker (``<family>/tiny.py``) does the same way: seed the weights without touching
the caller's RNG, refuse an unknown preset, build the tiny tokenizers, give the VAE latent statistics, and fix up
``model_index.json`` after diffusers saved the pipeline. A maker declares its sizes and components and calls these.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class TransformerSizes:
    """What every family's tiny ``Preset`` gives its transformer (under the config keys of the same names); the
    family's ``Preset`` subclass adds the rest of its sizes."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int


def check_preset(presets: Mapping[str, Any], preset: str, family: str = "") -> Any:
    """``presets[preset]``; a ``ValueError`` naming the allowed presets (and ``family``, when given) otherwise."""
    if preset not in presets:
        where = f" for {family}" if family else ""
        raise ValueError(f"preset={preset!r} is not known{where}; allowed: {sorted(presets)}")
    return presets[preset]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside: the global torch RNG seeded with ``seed``; after: the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def t5_unigram_tokenizer(words: Iterable[str]) -> Any:
    """A Unigram ``T5TokenizerFast``: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then single characters and word starts,
    then each of ``words`` as a word start (unless it is one already)."""
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    alphabet = string.ascii_letters + string.digits + string.punctuation
    pieces += [("▁" + ch, -4.0) for ch in alphabet]
    pieces += [(ch, -5.0) for ch in alphabet]
    pieces += [("▁" + word, -3.0) for word in words if ("▁" + word, -4.0) not in pieces]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def write_bpe_vocab_files(tokenizer_dir: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Also write ``vocab.json`` + ``merges.txt`` of a byte-level BPE tokenizer (what real CLIP and Qwen2
    checkpoints ship next to tokenizer.json), so tokenizer classes that do not read ``tokenizer.json``
    (transformers 4's slow ``CLIPTokenizer`` / ``Qwen2Tokenizer``) load the same tokenizer."""
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tokenizer_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def random_latent_stats(channels: int) -> tuple[list[float], list[float]]:
    """Seeded per-channel ``latents_mean`` / ``latents_std`` far from 0 / 1, as real VAEs' are, so a pipeline's
    de-normalisation counts (4 decimals, as a config.json would hold them)."""
    mean = (torch.rand(channels) - 0.5).tolist()
    std = (0.5 + 1.5 * torch.rand(channels)).tolist()
    return [round(m, 4) for m in mean], [round(s, 4) for s in std]


def update_model_index(model_index: Path, **entries: Any) -> None:
    """Set ``entries`` in the ``model_index.json`` diffusers saved (e.g. a tokenizer slot's class as real
    checkpoints name it, whatever alias the installed transformers saved), written back with sorted keys."""
    index = json.loads(model_index.read_text())
    index.update(entries)
    model_index.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
