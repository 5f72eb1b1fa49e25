"""The orchestrator's per-stage metrics count a batch's compute time once (``omni_stage_compute_seconds``: "Batch
compute time in a stage"), not once per item of it: a stage's compute sum over a time window is then its busy
time (tools/bench_serving.py's overlap table reads it). Queue wait stays per item."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fake_stages import FakeClient, fake_stages

from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.messages import Result, Work
from omni_runtime.runtime.orchestrator import Orchestrator
from omni_runtime.runtime.requests import parse_request

MODEL = str(Path(__file__).resolve().parent.parent / "models" / "tiny-flux")


class BatchedClient(FakeClient):
    """Answers the items of a request as one batch of ``n``: 1.5 s of compute each, item 0 first in the batch."""

    async def submit(self, work: Work) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(Result(req_id=work.req_id, index=work.index, stage=self.stage, replica=0,
                              image=b"img" if self.stage == "vae" else None, batch_size=2,
                              first_in_batch=work.index == 0, compute_s=1.5, queue_s=0.25))
        return fut


def test_a_batch_of_two_counts_its_compute_once_and_each_item_its_queue_wait():
    stages = fake_stages()
    stages.clients["denoiser"] = [BatchedClient("denoiser", 0)]

    async def scenario() -> bytes:
        orch = Orchestrator(config_from_dict({"model": {"path": MODEL}}), stages=stages)
        await orch.start()
        try:
            assert await orch.generate(parse_request({"prompt": "x", "n": 2, "seed": 1})) == [b"img"] * 2
            return orch.metrics.render()
        finally:
            await orch.shutdown()

    text = asyncio.run(scenario()).decode()
    assert 'omni_stage_compute_seconds_count{stage="denoiser"} 1.0' in text
    assert 'omni_stage_compute_seconds_sum{stage="denoiser"} 1.5' in text  # before: 2 and 3.0
    assert 'omni_stage_queue_wait_seconds_count{stage="denoiser"} 2.0' in text
    assert 'omni_batch_size_count{stage="denoiser"} 1.0' in text
