"""``Omni.close`` with work still pending on its loop: every task is cancelled and runs its cleanup before the loop
closes. Before, the loop was stopped with such tasks pending, so their cleanup never ran and Python printed
``Task was destroyed but it is pending`` and a ``RuntimeError: Event loop is closed`` traceback; ``batch`` did that
now and then on Ctrl-C (a request failing while the runtime shut down: tests/test_batch.py's Ctrl-C test failed on
that traceback in CI)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from omni_runtime.runtime import Omni
from omni_runtime.runtime.config_load import config_from_dict


@pytest.mark.timeout(120)
def test_close_cancels_pending_work_and_lets_it_clean_up(tiny_dir: Path) -> None:
    cleaned: list[str] = []

    async def pending(name: str) -> None:  # e.g. a request's coroutine waiting on a stage that is gone
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # its cleanup awaits too, as Orchestrator.generate's does
            cleaned.append(name)

    omni = Omni(config_from_dict({"model": {"path": str(tiny_dir)}}), in_process=True)
    futures = [asyncio.run_coroutine_threadsafe(pending(f"work{i}"), omni._loop) for i in range(3)]
    omni.close()
    assert sorted(cleaned) == ["work0", "work1", "work2"]
    assert all(f.cancelled() for f in futures)
