"""Byte-level BPE (GPT-2 / CLIP / Qwen2 tokenizers): the byte -> printable-character table the embedded tiny models'
tokenizers are built on, so every byte has a token."""

from __future__ import annotations


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2/CLIP), so every byte has a token."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}
