"""What the orchestrator's health tick asks of a replica (``runtime.stage_client.WatchedClient``): every client
answers ``dead``, ``hung`` and ``forgive``; a process replica's ``forgive`` restarts its heartbeat clocks (the tick
calls it when the frontend itself stalled), so late heartbeats are not judged a hang."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fake_stages import FakeClient

from omni_runtime.runtime.liveness import RankWatch
from omni_runtime.runtime.messages import Heartbeat
from omni_runtime.runtime.stage_client import InProcessStageClient, WatchedClient, ZmqStageClient


@pytest.mark.parametrize("cls", [ZmqStageClient, InProcessStageClient, FakeClient])
def test_every_client_answers_what_the_health_tick_asks(cls):
    for name in ("dead", "hung", "forgive"):
        assert name in WatchedClient.__dict__ and callable(getattr(cls, name, None)), (cls.__name__, name)


def test_a_process_replica_forgives_heartbeats_that_came_late_because_the_frontend_stalled():
    now = [100.0]
    procs = SimpleNamespace(stage="denoiser", replica=0, place=SimpleNamespace(world_size=1), generation=1,
                            label="denoiser[0]")
    c = ZmqStageClient(procs, stall_timeout_s=4.0)
    c.watch = RankWatch(1, 4.0, clock=lambda: now[0])
    c.watch.reset(1)
    c.watch.loaded()
    c.sender = object()  # started
    c.beat(Heartbeat(stage="denoiser", replica=0, rank=0, generation=1, pid=1))
    now[0] += 5.0  # silent past stall_timeout_s
    assert c.hung() is not None and c.hung()[0] == 0
    c.forgive()
    assert c.hung() is None
