"""Which waiting items join the denoiser's running set at a step boundary (step-level scheduling).

The policy is first come, first served, ordered by each request's ``priority`` (a bounded extension field,
``runtime.requests.FIELDS``; higher first). Age raises it: an item's rank is ``priority + waited / aging_s``, so a
low-priority item overtakes every newer one eventually and never starves. Walking the waiting items in rank
order, an item joins while it fits (``max_batch_size`` items, ``max_batch_pixels`` of n x W x H summed over the
set) and can share the running set's forward (same join key: image size and text length). The walk stops at the
first item that cannot share the forward: that item is next, the running set drains for it and it then starts the
next set, so an item with another join key waits at most for the running requests to finish.

With mixed image sizes (``[stages.denoiser] mixed_sizes``; ``max_padding_waste`` given here) the join key is the
text length alone, and an item also fits only while the forward's padding waste (padded image tokens / all image
tokens of the forward, every row padded to the longest) stays <= ``max_padding_waste``; the walk stops at the first
item that would raise it past that, as at an item of another join key.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["Candidate", "StepScheduler", "forward_waste"]


@dataclass(frozen=True)
class Candidate:
    """What the policy needs of an item: its join key, pixels (W x H), priority and arrival time; with mixed sizes
    also its image tokens per row and its rows (branches) in a step's forward."""

    key: Hashable
    pixels: int
    priority: int
    arrived: float
    tokens: int = 0
    rows: int = 1


def forward_waste(items: Sequence[Candidate]) -> float:
    """Padded image tokens / all image tokens of one forward over ``items``, each row padded to the longest."""
    if not items:
        return 0.0
    longest = max(c.tokens for c in items)
    total = longest * sum(c.rows for c in items)
    return sum((longest - c.tokens) * c.rows for c in items) / total if total else 0.0


class StepScheduler:
    """The admission policy of one denoiser replica under step-level scheduling."""

    def __init__(self, *, max_batch_size: int, max_batch_pixels: int = 0, aging_s: float = 10.0,
                 max_padding_waste: float | None = None) -> None:
        """``max_padding_waste`` (0..1): items of different image sizes share a forward while its padding waste
        stays at most this (mixed sizes); None: they do not (their join keys differ)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size = {max_batch_size}: must be >= 1")
        if aging_s <= 0:
            raise ValueError(f"aging_s = {aging_s}: must be > 0")
        if max_padding_waste is not None and not 0 <= max_padding_waste <= 1:
            raise ValueError(f"max_padding_waste = {max_padding_waste}: must be between 0 and 1")
        self.max_padding_waste = max_padding_waste
        self.max_batch_size = max_batch_size
        self.max_batch_pixels = max_batch_pixels
        self.aging_s = aging_s

    def rank(self, c: Candidate, now: float) -> float:
        """The effective priority: ``priority + waited / aging_s``."""
        return c.priority + max(0.0, now - c.arrived) / self.aging_s

    def order(self, waiting: Sequence[Candidate], now: float) -> list[int]:
        """Indices of ``waiting`` best first (rank, then arrival, then position)."""
        return sorted(range(len(waiting)), key=lambda i: (-self.rank(waiting[i], now), waiting[i].arrived, i))

    def admit(self, waiting: Sequence[Candidate], running: Sequence[Candidate], now: float) -> list[int]:
        """Indices of the ``waiting`` items that join the ``running`` ones now, best first."""
        key = running[0].key if running else None
        members = list(running)
        count = len(running)
        pixels = sum(c.pixels for c in running)
        out: list[int] = []
        for i in self.order(waiting, now):
            c = waiting[i]
            if key is None:
                key = c.key
            if c.key != key or count >= self.max_batch_size:
                break
            if self.max_batch_pixels and count and pixels + c.pixels > self.max_batch_pixels:
                break
            if (self.max_padding_waste is not None and members
                    and forward_waste([*members, c]) > self.max_padding_waste):
                break
            members.append(c)
            out.append(i)
            count += 1
            pixels += c.pixels
        return out
