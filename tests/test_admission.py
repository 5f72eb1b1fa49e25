"""The orchestrator alone (stage clients that answer without computing): admission is atomic per stage, and a
task the frontend needs (the result listener) that dies makes health fail, fails waiting requests and calls
``on_fatal``; ``serve`` then exits non-zero. The result listener itself survives any message."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from fake_stages import fake_stages

from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.launcher import free_port
from omni_runtime.runtime.orchestrator import Orchestrator, Overloaded, StageUnavailable
from omni_runtime.runtime.requests import parse_request

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "models" / "tiny-flux")


def _cfg(max_queue: int = 64):
    return config_from_dict({"model": {"path": MODEL}, "server": {"max_queue": max_queue}})


@pytest.mark.parametrize(("max_queue", "n", "admitted"), [(1, 1, 1), (4, 1, 4), (4, 3, 1), (5, 2, 2)])
def test_simultaneous_requests_admit_exactly_what_fits(max_queue, n, admitted):
    req = parse_request({"prompt": "x", "n": n, "seed": 1})

    async def scenario():
        orch = Orchestrator(_cfg(max_queue), stages=fake_stages(delay=0.2))
        await orch.start()
        peak = dict.fromkeys(orch.waiting, 0)

        async def sample():
            while True:
                for s, v in orch.waiting.items():
                    peak[s] = max(peak[s], v)
                await asyncio.sleep(0.01)

        sampler = asyncio.ensure_future(sample())
        try:
            results = await asyncio.gather(*[orch.generate(req) for _ in range(16)], return_exceptions=True)
        finally:
            sampler.cancel()
            await orch.shutdown()
        return results, peak, dict(orch.waiting)

    results, peak, left = asyncio.run(scenario())
    ok = [r for r in results if isinstance(r, list)]
    over = [r for r in results if isinstance(r, Overloaded)]
    assert (len(ok), len(over)) == (admitted, 16 - admitted), results
    assert all(r == [b"img"] * n for r in ok)
    assert max(peak.values()) <= max_queue
    assert left == {"text_encoder": 0, "denoiser": 0, "vae": 0}
    assert f"max_queue {max_queue}" in str(over[0])


def test_a_dead_result_listener_fails_health_and_waiting_requests_and_calls_on_fatal():
    req = parse_request({"prompt": "x", "seed": 1})

    async def scenario():
        boom = asyncio.Event()

        async def listener():
            await boom.wait()
            raise RuntimeError("listener bug")

        reasons: list[str] = []
        orch = Orchestrator(_cfg(), stages=fake_stages(delay=30, extra=[listener()]), on_fatal=reasons.append)
        await orch.start()
        try:
            assert orch.health() == {"text_encoder": [True], "denoiser": [True], "vae": [True]}
            waiting = asyncio.ensure_future(orch.generate(req))
            await asyncio.sleep(0.1)
            boom.set()
            with pytest.raises(StageUnavailable, match="omni-results ended .*listener bug"):
                await asyncio.wait_for(waiting, 5)
            assert orch.health()["orchestrator"] == [False]
            with pytest.raises(StageUnavailable, match="listener bug"):
                await orch.generate(req)
        finally:
            await orch.shutdown()
        return reasons

    reasons = asyncio.run(scenario())
    assert len(reasons) == 1 and "listener bug" in reasons[0]


def test_health_route_fails_once_the_orchestrator_failed():
    from starlette.testclient import TestClient

    from omni_runtime.runtime.server import create_app

    cfg = _cfg()
    orch = Orchestrator(cfg, stages=fake_stages())
    with TestClient(create_app(cfg, orchestrator=orch)) as client:
        assert client.get("/health").status_code == 200
        orch.fail("test: the listener died")
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["stages"]["orchestrator"] == [False]


def test_listener_survives_unexpected_messages_and_keeps_routing(tmp_path):
    from omni_runtime.comm.channel import SyncSender
    from omni_runtime.runtime.messages import Ready, Result
    from omni_runtime.runtime.stage_client import ResultListener

    class Procs:
        stage, replica, generation, label = "denoiser", 0, 1, "denoiser[0]"

    from omni_runtime.runtime.stage_client import ZmqStageClient

    addr = f"ipc://{tmp_path}/results"

    async def scenario():
        client = ZmqStageClient(Procs())
        listener = ResultListener(addr, {"text_encoder": [], "denoiser": [client], "vae": []})
        task = asyncio.ensure_future(listener.run())
        from omni_runtime.runtime.messages import Work
        from omni_runtime.runtime.requests import parse_request as pr

        work = Work(req_id="r1", index=0, seed=1, params=pr({"prompt": "x"}))
        fut = client.add(work)
        with SyncSender(addr) as out:
            out.send(Ready(stage="bogus", replica=0, pids=[1]))
            out.send(Ready(stage="denoiser", replica=7, pids=[1]))
            out.send(Result(req_id="r1", index=0, stage="denoiser", replica=-1))
            out.send(Result(req_id="zz", index=3, stage="denoiser", replica=0))  # nobody waits for it
            out.send_frames([b"\x93garbage"])
            out.send_frames([b"not msgpack at all", b"extra"])
            out.send(Ready(stage="denoiser", replica=0, pids=[1]))
            out.send(Result(req_id="r1", index=0, stage="denoiser", replica=0, batch_size=1))
            res = await asyncio.wait_for(fut, 5)
        assert not task.done()
        ignored = listener.ignored
        task.cancel()
        listener.close()
        return res, client.ready, ignored

    res, ready, ignored = asyncio.run(scenario())
    assert res.req_id == "r1" and res.ok
    assert ready
    assert ignored == 5


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_serve_exits_non_zero_when_the_result_listener_dies(tmp_path):
    """``serve`` with stage clients that answer without computing and a result listener that dies 2 s in."""
    script = tmp_path / "serve_dies.py"
    port = free_port()
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from fake_stages import fake_stages
        from omni_runtime.runtime import stage_client
        from omni_runtime.runtime.config_load import config_from_dict
        from omni_runtime.runtime.server import serve

        async def listener():
            await asyncio.sleep(2)
            raise RuntimeError("listener bug")

        stage_client.zmq_stages = lambda cfg: fake_stages(extra=[listener()])
        cfg = config_from_dict({{"model": {{"path": {MODEL!r}}}, "server": {{"port": {port}}}}})
        sys.exit(serve(cfg))
    """))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ})
    try:
        seen_ok = False
        end = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < end:
            try:
                seen_ok |= httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        code = proc.wait(30)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen_ok, out[-3000:]
    assert code == 1, out[-3000:]
    assert "the task omni-results ended (RuntimeError: listener bug)" in out
    assert "stopped serving because the frontend failed" in out


