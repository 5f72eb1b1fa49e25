"""Helper for tests (no tests here): stage clients that answer without computing, to test the orchestrator alone.

``FakeClient`` follows ``runtime.stage_client.StageClient``: every submitted item resolves after ``delay`` seconds
with an ok Result (the VAE's carries ``b"img"``). ``fake_stages(cfg, extra=...)`` returns a StageSet of them whose
``open()`` also hands the orchestrator the coroutines in ``extra`` to keep running (as the ZMQ set hands it the
result listener).
"""

from __future__ import annotations

import asyncio
from typing import Any

from omni_runtime.runtime.config import STAGE_NAMES
from omni_runtime.runtime.messages import Result, Work
from omni_runtime.runtime.stage_client import StageSet


class FakeClient:
    restartable = False
    generation = 1

    def __init__(self, stage: str, delay: float) -> None:
        self.stage, self.replica, self.delay = stage, 0, delay
        self.ready = False
        self.outstanding = 0
        self.on_ready = None
        self.inflight: dict[tuple[str, int], asyncio.Future] = {}
        self.submitted = 0

    @property
    def label(self) -> str:
        return f"{self.stage}[0] (fake)"

    async def start(self) -> None:
        self.ready = True

    def dead(self) -> None:
        return None

    def hung(self) -> None:
        return None

    def forgive(self) -> None:
        pass

    async def submit(self, work: Work) -> asyncio.Future:
        self.submitted += 1
        fut = asyncio.get_running_loop().create_future()
        self.inflight[(work.req_id, work.index)] = fut
        self.outstanding += 1

        def answer() -> None:
            self.outstanding -= 1
            if not fut.done():
                fut.set_result(Result(req_id=work.req_id, index=work.index, stage=self.stage, replica=0,
                                      image=b"img" if self.stage == "vae" else None))

        asyncio.get_running_loop().call_later(self.delay, answer)
        return fut

    async def cancel(self, work: Work) -> None:
        fut = self.inflight.pop((work.req_id, work.index), None)
        if fut is not None and not fut.done():
            fut.cancel()

    def fail_inflight(self, exc: BaseException) -> None:
        for fut in self.inflight.values():
            if not fut.done():
                fut.set_exception(exc)
        self.inflight.clear()

    async def restart(self, delay: float) -> None:
        raise RuntimeError("not restartable")

    async def stop(self) -> None:
        self.ready = False

    def close(self) -> None:
        pass


class FakeStageSet(StageSet):
    def __init__(self, delay: float, extra: list[Any]) -> None:
        super().__init__({s: [FakeClient(s, delay)] for s in STAGE_NAMES})
        self.extra = extra

    async def open(self) -> list[Any]:
        await super().open()
        return list(self.extra)


def fake_stages(delay: float = 0.05, extra: list[Any] | None = None) -> FakeStageSet:
    return FakeStageSet(delay, extra or [])
