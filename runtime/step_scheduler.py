"""Which waiting items join the denoiser's running set at a step boundary (step-level scheduling).

The policy is first come, first served, ordered by each request's ``priority`` (a bounded extension field,
``runtime.requests.FIELDS``; higher first). Age raises it: an item's rank is ``priority + waited / aging_s``, so a
low-priority item overtakes every newer one eventually and never starves. Walking the waiting items in rank
order, an item joins while it fits (``max_batch_size`` items, ``max_batch_pixels`` of n x W x H summed over the
set) and can share the running set's forward (same join key: image size and text length). The walk stops at the
first item that cannot share the forward: that item is next, the running set drains for it and it then starts the
next set, so an item with another join key waits at most for the running requests to finish.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["Candidate", "StepScheduler"]


@dataclass(frozen=True)
class Candidate:
    """What the policy needs of an item: its join key, pixels (W x H), priority and arrival time."""

    key: Hashable
    pixels: int
    priority: int
    arrived: float


class StepScheduler:
    """The admission policy of one denoiser replica under step-level scheduling."""

    def __init__(self, *, max_batch_size: int, max_batch_pixels: int = 0, aging_s: float = 10.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size = {max_batch_size}: must be >= 1")
        if aging_s <= 0:
            raise ValueError(f"aging_s = {aging_s}: must be > 0")
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
            out.append(i)
            count += 1
            pixels += c.pixels
        return out
