"""Per-request progress (denoising steps done / total), as ``GET /v1/requests/{id}`` shows it.

The orchestrator opens an entry per request (:meth:`ProgressBook.open`), the denoiser's step reports
(:class:`~runtime.messages.StepReport`) move its images' step counts, and the end of the request closes it with its
final status. Finished entries are kept for the last :data:`KEEP_FINISHED` requests, so a client that polls after
the answer still sees the outcome.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from omni_runtime.runtime.messages import StepReport

logger = logging.getLogger(__name__)

KEEP_FINISHED = 1024
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
STATUSES = ("queued", "running", "completed", "failed", "cancelled")


def valid_request_id(rid: str) -> bool:
    """1 to 64 characters of ``A-Z a-z 0-9 . _ -``."""
    return bool(_REQUEST_ID.fullmatch(rid))


@dataclass
class RequestProgress:
    id: str
    n: int
    steps: int
    priority: int = 0
    created: float = field(default_factory=time.time)
    status: str = "queued"
    done: list[int] = field(default_factory=list)   # steps done per image

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "image.generation.progress", "status": self.status,
                "created": int(self.created), "priority": self.priority,
                "steps_done": sum(self.done), "steps_total": self.n * self.steps,
                "images": [{"index": i, "steps_done": d, "steps_total": self.steps} for i, d in enumerate(self.done)]}


class ProgressBook:
    """The progress of the requests in flight and of the last finished ones, by request id."""

    def __init__(self, keep_finished: int = KEEP_FINISHED) -> None:
        self.active: dict[str, RequestProgress] = {}
        self.finished: OrderedDict[str, RequestProgress] = OrderedDict()
        self.keep_finished = keep_finished

    def busy(self, rid: str) -> bool:
        return rid in self.active

    def open(self, rid: str, n: int, steps: int, priority: int = 0) -> RequestProgress:
        self.finished.pop(rid, None)
        p = self.active[rid] = RequestProgress(rid, n, steps, priority, done=[0] * n)
        return p

    def get(self, rid: str) -> RequestProgress | None:
        return self.active.get(rid) or self.finished.get(rid)

    def report(self, msg: StepReport) -> None:
        for it in msg.progress:
            p = self.active.get(it.req_id)
            if p is not None and 0 <= it.index < p.n:
                p.done[it.index] = max(p.done[it.index], min(it.done, p.steps))
                p.status = "running"

    def denoised(self, rid: str, index: int) -> None:
        p = self.active.get(rid)
        if p is not None and 0 <= index < p.n:
            p.done[index] = p.steps

    def close(self, rid: str, status: str) -> None:
        p = self.active.pop(rid, None)
        if p is None:
            return
        p.status = status
        self.finished[rid] = p
        while len(self.finished) > self.keep_finished:
            self.finished.popitem(last=False)
