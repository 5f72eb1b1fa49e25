"""Per-forward sequence-parallel context: what the sp_plan hooks learned, for attention to read.

``auto_pad`` pads a sequence to a multiple of the SP degree; the hooks record here the
local key-padding mask (True = real token) so that :func:`sp_attention` ignores the
pad (also when the caller passes a mask of its own: the two are combined), and the lengths so that the output
gather can strip the pad again, and the shard sizes of every rank so that attention
needs no length exchange. ``values`` keeps the sizes of the model's forward
arguments for ``SequenceParallelPartialInput.text_len_source``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class SPForwardContext:
    """State of one sequence-parallel forward pass."""

    # dim size before padding -> size after padding (auto_pad), for every padded sequence length
    padded_lengths: dict[int, int] = field(default_factory=dict)
    # local key-padding mask (local_seq,) bool for the padded sequence, True = real token
    key_padding_mask: torch.Tensor | None = None
    # forward arguments of the model (name -> value) for text_len_source lookups
    values: dict[str, Any] = field(default_factory=dict)
    # every distinct split of a sequence the hooks made: the shard size of each SP rank. With exactly one,
    # attention knows every rank's length without asking (the same on all ranks, by construction)
    shard_layouts: list[tuple[int, ...]] = field(default_factory=list)

    def record_layout(self, sizes: tuple[int, ...]) -> None:
        if sizes not in self.shard_layouts:
            self.shard_layouts.append(sizes)


_STACK: list[SPForwardContext] = []


def get_sp_forward_context() -> SPForwardContext | None:
    """The innermost active context, or None outside an SP forward pass."""
    return _STACK[-1] if _STACK else None


def push_sp_forward_context(ctx: SPForwardContext) -> None:
    _STACK.append(ctx)


def pop_sp_forward_context(ctx: SPForwardContext) -> None:
    if _STACK and _STACK[-1] is ctx:
        _STACK.pop()
    elif ctx in _STACK:
        _STACK.remove(ctx)


@contextmanager
def sp_forward_context(ctx: SPForwardContext | None = None) -> Iterator[SPForwardContext]:
    ctx = ctx if ctx is not None else SPForwardContext()
    push_sp_forward_context(ctx)
    try:
        yield ctx
    finally:
        pop_sp_forward_context(ctx)
