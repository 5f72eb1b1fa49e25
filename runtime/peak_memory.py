"""The peak memory of a stage rank while it computes one batch or one denoising step (``peak_memory_mb``).

Which number, by device:

- CPU: the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``), reset to the current RSS
  before the compute by writing ``5`` to ``/proc/self/clear_refs`` (Linux). It is the most physical memory the
  rank process held at any moment of the compute: weights, activations and everything else resident. Where the
  reset is not possible (not Linux, a locked-down /proc) the mark cannot be reset, and the current RSS after the
  compute is reported instead (``method = "rss"``; a lower bound of the peak).
- CUDA: ``torch.cuda.max_memory_allocated`` of the rank's device after ``torch.cuda.reset_peak_memory_stats``:
  the most memory the caching allocator handed out to tensors during the compute (weights included; the
  allocator's reserved-but-free cache and non-torch allocations are not counted).

A process shares its high-water mark with everything in it: with ``Omni(in_process=True)`` all stages run on
threads of one process, so a stage's number then includes what the others held at the same time, and one
stage's reset can hide an earlier peak of another's (the numbers are exact per rank process in served and
``Omni()`` runs, where each stage rank is its own process).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
MB = 1e6


def _status_kb(key: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of this rank over a window: :meth:`reset` at its start, :meth:`read_mb` at its end."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.method = "cuda_max_allocated"
        elif self._can_reset():
            self.method = "vmhwm"
        else:
            self.method = "rss"
            logger.info("peak_memory_mb: /proc/self/clear_refs cannot reset the RSS high-water mark here; "
                        "reporting the RSS after each compute instead")

    @staticmethod
    def _can_reset() -> bool:
        if _status_kb("VmHWM") is None:
            return False
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return True

    def reset(self) -> None:
        if self.method == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "vmhwm":
            try:
                CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
            except OSError:  # pragma: no cover - it worked at start
                self.method = "rss"

    def read_mb(self) -> float:
        """The peak since the last :meth:`reset`, in MB (10^6 bytes)."""
        if self.method == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device) / MB
        kb = _status_kb("VmHWM" if self.method == "vmhwm" else "VmRSS")
        return 0.0 if kb is None else kb * 1024 / MB
