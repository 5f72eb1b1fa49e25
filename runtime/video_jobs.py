"""The job store of ``/v1/videos``: bounded (``[video] max_jobs``), finished jobs expire after ``[video] job_ttl_s``.

A job is one video request running as an asyncio task in the server process (``runtime.video_api`` starts it): it
goes ``queued`` -> ``in_progress`` (the denoiser reported a step) -> ``completed`` or ``failed``, its progress
(0-100) is the denoiser's steps done / total from the orchestrator's progress book. A completed job's files (the
frames zip, the mp4, the thumbnail) live in ``<the instance's run dir>/videos/<job id>/``; they are removed when the
job expires, on DELETE (which also cancels a running job at the next step boundary) and at shutdown; after a
SIGKILL the next instance's sweep of dead run directories (``comm.cleanup.sweep_dead``) removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STATUSES = ("queued", "in_progress", "completed", "failed")
FILES = {"video": ("video.mp4", "video/mp4"), "thumbnail": ("thumbnail.png", "image/png"),
         "frames": ("frames.zip", "application/zip")}


class StoreFull(Exception):
    """``max_jobs`` jobs are kept; the client retries once one expired or was deleted."""


@dataclass
class VideoJob:
    id: str
    model: str
    size: str
    seconds: str
    fps: int
    num_frames: int
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"
    completed_at: int | None = None
    error: dict[str, str] | None = None
    task: asyncio.Task | None = None
    finished: float | None = None  # time.monotonic() when it completed or failed
    #: extension fields once the stages answered (``cache``: what cache acceleration skipped; ``peak_memory_mb``)
    report: dict[str, Any] = field(default_factory=dict)

    def as_json(self, steps: tuple[int, int] | None) -> dict[str, Any]:
        """The OpenAI video object; ``steps`` = (done, total) denoising steps while it runs."""
        progress = 100 if self.status == "completed" else 0
        if self.status in ("queued", "in_progress") and steps is not None and steps[1] > 0:
            progress = min(99, 100 * steps[0] // steps[1])  # 100 only once the files are written
        return {"id": self.id, "object": "video", "model": self.model, "status": self.status,
                "progress": progress, "created_at": self.created_at, "completed_at": self.completed_at,
                "size": self.size, "seconds": self.seconds, "num_frames": self.num_frames, "fps": self.fps,
                "error": self.error, **{k: self.report[k] for k in ("cache", "peak_memory_mb") if self.report.get(k)}}


class VideoJobStore:
    """The jobs by id, at most ``max_jobs``; finished ones leave ``ttl_s`` after they finished."""

    def __init__(self, root: Callable[[], Path], max_jobs: int, ttl_s: float) -> None:
        self._root = root  # where the files go (created on the first job)
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self.jobs: dict[str, VideoJob] = {}
        self.root: Path | None = None

    def dir(self, job: VideoJob) -> Path:
        if self.root is None:
            self.root = self._root()
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.root / job.id

    def expire(self) -> None:
        now = time.monotonic()
        for job in [j for j in self.jobs.values() if j.finished is not None and now - j.finished >= self.ttl_s]:
            logger.info("video job %s expired", job.id)
            self._remove(job)

    def add(self, job: VideoJob) -> None:
        self.expire()
        if len(self.jobs) >= self.max_jobs:
            raise StoreFull(f"{len(self.jobs)} video jobs are kept ([video] max_jobs = {self.max_jobs}); retry once "
                            f"one has expired ([video] job_ttl_s = {self.ttl_s:g} s) or was deleted")
        self.jobs[job.id] = job

    def get(self, job_id: str) -> VideoJob | None:
        self.expire()
        return self.jobs.get(job_id)

    def list(self) -> list[VideoJob]:
        self.expire()
        return sorted(self.jobs.values(), key=lambda j: (j.created_at, j.id))

    def finish(self, job: VideoJob, status: str, error: dict[str, str] | None = None) -> None:
        job.status, job.error, job.finished = status, error, time.monotonic()
        job.completed_at = int(time.time()) if status == "completed" else None
        if job.id not in self.jobs:  # deleted while it finished: its files go too
            self._remove_files(job)

    async def delete(self, job_id: str) -> VideoJob | None:
        """Cancel (at the next denoising step) and remove a job and its files; None if there is none."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        await self._cancel(job)
        self._remove(job)
        return job

    async def close(self) -> None:
        """Shutdown: cancel every job and remove every file."""
        for job in list(self.jobs.values()):
            await self._cancel(job)
            self._remove(job)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            run_dir = self.root.parent  # the instance's run dir: gone too if nothing but its owner record is left
            with contextlib.suppress(OSError):
                if all(p.name == "owner" or p.name.startswith(".owner") for p in run_dir.iterdir()):
                    shutil.rmtree(run_dir, ignore_errors=True)

    async def _cancel(self, job: VideoJob) -> None:
        if job.task is not None and not job.task.done():
            job.task.cancel()
            with contextlib.suppress(BaseException):
                await job.task

    def _remove(self, job: VideoJob) -> None:
        self.jobs.pop(job.id, None)
        self._remove_files(job)

    def _remove_files(self, job: VideoJob) -> None:
        if self.root is not None:
            shutil.rmtree(self.root / job.id, ignore_errors=True)
