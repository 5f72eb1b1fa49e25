"""comm.channel: real two-process round trips over ipc and tcp, zero copy, HWM, close, timeouts."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
import uvloop
import zmq
from spawn import run_workers

from omni_runtime.comm import serde
from omni_runtime.comm.channel import (
    ChannelClosed,
    ChannelTimeout,
    Receiver,
    Sender,
    SyncReceiver,
    SyncSender,
    ipc_endpoint,
    remove_ipc_dir,
    tcp_endpoint,
)
from omni_runtime.runtime.launcher import free_port

ROOT = str(Path(__file__).resolve().parent.parent)


@pytest.fixture(autouse=True)
def _own_instance(monkeypatch):
    """Each test gets its own runtime instance (ipc directory), and must leave no socket behind."""
    monkeypatch.setenv("OMNI_RUNTIME_INSTANCE", f"chtest{os.getpid()}")
    yield
    assert remove_ipc_dir() == []


class Work(msgspec.Struct):
    request_id: int
    latents: torch.Tensor
    extras: dict[str, Any] = {}


class Result(msgspec.Struct):
    request_id: int
    out: torch.Tensor
    digest: str
    frame_view: bool


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _make_latents(i: int, big_numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    n = big_numel if i == 0 else (1 << 15) + i  # results (float32) above pyzmq's 64 KiB copy threshold
    return torch.randn(n, generator=g).to(torch.bfloat16)


def _in_frame(t: torch.Tensor, frame: zmq.Frame) -> bool:
    start = np.frombuffer(frame, dtype=np.uint8).ctypes.data
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + len(frame)


def _driver(work_ep: str, result_ep: str, n: int) -> dict:
    """Stage-driver side: blocking PULL for work, PUSH for results."""
    work, results = SyncReceiver(work_ep, rcvhwm=8), SyncSender(result_ep, sndhwm=8)
    try:
        for _ in range(n):
            frames = work.recv_frames(timeout=30)
            msg = serde.decode(frames, Work)
            in_frame = _in_frame(msg.latents, frames[1])
            results.send(Result(msg.request_id, msg.latents.float() * 2, _digest(msg.latents), in_frame),
                         timeout=30)
    finally:
        work.close()
        results.close(linger=10)  # let the last results reach the orchestrator
    return {"received": n}


async def _orchestrator(work_ep: str, result_ep: str, n: int, big_numel: int) -> dict:
    """Orchestrator side under uvloop: PUSH work, PULL results."""
    async with Sender(work_ep, sndhwm=4) as work, Receiver(result_ep, rcvhwm=16) as results:
        sent = {}
        for i in range(n):
            lat = _make_latents(i, big_numel)
            sent[i] = lat
            await work.send(Work(i, lat, {"step": i, "note": "x" * i}), timeout=30)
        got = []
        for _ in range(n):
            r = await results.recv(Result, timeout=30)
            exact = torch.equal(r.out, sent[r.request_id].float() * 2)
            got.append([r.request_id, r.digest == _digest(sent[r.request_id]), exact, r.frame_view])
    return {"results": got, "loop": type(asyncio.get_running_loop()).__module__}


def _role(rank: int, world_size: int, work_ep: str, result_ep: str, n: int, big_numel: int) -> dict:
    if rank == 0:
        return uvloop.run(_orchestrator(work_ep, result_ep, n, big_numel))
    return _driver(work_ep, result_ep, n)


def _check_round_trip(out: list[dict], n: int) -> None:
    orch, drv = out
    assert drv == {"received": n}
    assert orch["loop"].startswith("uvloop")
    assert orch["results"] == [[i, True, True, True] for i in range(n)]


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_ipc_round_trip_two_processes():
    work_ep, result_ep = ipc_endpoint("work-ipc"), ipc_endpoint("results-ipc")
    n = 30
    out = run_workers(_role, 2, args=(work_ep, result_ep, n, 8 << 20), timeout=90)  # 16 MiB bf16 first
    _check_round_trip(out, n)
    for ep in (work_ep, result_ep):
        assert not os.path.exists(ep[len("ipc://"):])
    assert remove_ipc_dir() == []  # nothing left behind but the (now removed) directory
    assert not os.path.exists(os.path.dirname(work_ep[len("ipc://"):]))


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_tcp_round_trip_two_processes():
    work_ep = tcp_endpoint("127.0.0.1", free_port())
    result_ep = tcp_endpoint("127.0.0.1", free_port())
    n = 10
    out = run_workers(_role, 2, args=(work_ep, result_ep, n, 1 << 20), timeout=90)
    _check_round_trip(out, n)


# ----------------------------------------------------------------------------- in-process checks


def test_hwm_and_linger_are_configured():
    ep = ipc_endpoint("hwm-check")
    with SyncReceiver(ep, sndhwm=3, rcvhwm=17) as r, SyncSender(ep, sndhwm=5, rcvhwm=9) as s:
        assert (r.socket.getsockopt(zmq.SNDHWM), r.socket.getsockopt(zmq.RCVHWM)) == (3, 17)
        assert (s.socket.getsockopt(zmq.SNDHWM), s.socket.getsockopt(zmq.RCVHWM)) == (5, 9)
        assert r.socket.getsockopt(zmq.LINGER) == 0 and s.socket.getsockopt(zmq.LINGER) == 0
        assert r.socket.getsockopt(zmq.TYPE) == zmq.PULL and s.socket.getsockopt(zmq.TYPE) == zmq.PUSH


def test_close_removes_ipc_file_and_blocks_use():
    ep = ipc_endpoint("close-check")
    path = ep[len("ipc://"):]

    async def main():
        r = Receiver(ep)
        assert os.path.exists(path) and r.bound
        r.close()
        assert not os.path.exists(path)
        with pytest.raises(ChannelClosed):
            await r.recv()
        r.close()  # idempotent

    uvloop.run(main())
    assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == "0o700"


def test_async_round_trip_zero_copy_under_uvloop():
    ep = ipc_endpoint("async-local")
    big = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB

    async def main():
        async with Receiver(ep) as r, Sender(ep) as s:
            await s.send({"t": big, "a": np.arange(10)})
            frames = await r.recv_frames(timeout=10)
            obj = serde.decode(frames)
            with pytest.raises(ChannelTimeout):
                await r.recv(timeout=0.05)
            return obj, frames, type(asyncio.get_running_loop()).__module__

    obj, frames, loop_mod = uvloop.run(main())
    assert loop_mod.startswith("uvloop")
    assert torch.equal(obj["t"], big) and obj["a"].tolist() == list(range(10))
    assert _in_frame(obj["t"], frames[1])


def test_backpressure_and_send_timeout():
    ep = ipc_endpoint("backpressure")
    with SyncSender(ep, sndhwm=2) as s:
        sent = 0
        with pytest.raises(ChannelTimeout):
            for i in range(50):
                s.send({"i": i}, timeout=0.05)
                sent += 1
        assert 1 <= sent <= 4  # bounded by the HWM, not by the 50 we tried
        with SyncReceiver(ep) as r:
            got = [r.recv(timeout=5)["i"] for _ in range(sent)]
            assert got == list(range(sent))
            with pytest.raises(ChannelTimeout):
                r.recv(timeout=0.1)


def test_zero_copy_send_is_tracked_until_released():
    ep = ipc_endpoint("tracked")
    big = torch.ones(1 << 18)  # 1 MiB: sent zero copy
    with SyncSender(ep, sndhwm=4) as s:
        s.send({"t": big})
        assert not s.sent() and not s.wait_sent(0.05)  # no peer yet: ZMQ still holds the tensor
        with SyncReceiver(ep) as r:
            got = r.recv(timeout=5)
            assert s.wait_sent(5) and s.sent()
            assert torch.equal(got["t"], big)
            s.send({"small": torch.ones(4)})  # copied by pyzmq: nothing new to track
            assert s.sent()
            assert r.recv(timeout=5)["small"].tolist() == [1.0] * 4


def test_malformed_message_raises_serde_error_and_channel_survives():
    ep = ipc_endpoint("malformed")
    with SyncReceiver(ep) as r:
        raw = zmq.Context.instance().socket(zmq.PUSH)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(ep)
        try:
            raw.send_multipart([serde.encode({"t": torch.ones(100)})[0], b"short"])
            raw.send_multipart([b"\xc1garbage"])
            raw.send_multipart(serde.encode({"ok": 1}))
            with pytest.raises(serde.SerdeError, match="needs 400 bytes"):
                r.recv(timeout=5)
            with pytest.raises(serde.SerdeError):
                r.recv(timeout=5)
            assert r.recv(timeout=5) == {"ok": 1}
        finally:
            raw.close(linger=0)


def test_tcp_port_zero_reports_bound_port():
    with SyncReceiver(tcp_endpoint("127.0.0.1", 0)) as r:
        port = int(r.endpoint.rsplit(":", 1)[1])
        assert r.endpoint == f"tcp://127.0.0.1:{port}" and port > 0
        with SyncSender(tcp_endpoint("127.0.0.1", port)) as s:
            s.send(torch.tensor([1.5, 2.5]))
            assert r.recv(timeout=5).tolist() == [1.5, 2.5]


def test_endpoint_validation():
    assert tcp_endpoint("::1", 5555) == "tcp://[::1]:5555"
    assert tcp_endpoint("node-3", 0) == "tcp://node-3:*"
    with pytest.raises(ValueError, match="port=70000"):
        tcp_endpoint("127.0.0.1", 70000)
    with pytest.raises(ValueError, match="name='../x'"):
        ipc_endpoint("../x")
    with pytest.raises(ValueError, match="sndhwm=-1"):
        SyncSender(ipc_endpoint("bad-hwm"), sndhwm=-1)
    with pytest.raises(ValueError, match="endpoint='http://x'"):
        SyncSender("http://x")
    a, b = ipc_endpoint("same"), ipc_endpoint("same")
    assert a == b and os.environ["OMNI_RUNTIME_INSTANCE"] in a


@pytest.mark.timeout(60)
def test_remove_ipc_dir_sweeps_sockets_of_a_killed_process(monkeypatch):
    monkeypatch.setenv("OMNI_RUNTIME_INSTANCE", f"chkill{os.getpid()}")
    ep = ipc_endpoint("victim")
    path = ep[len("ipc://"):]
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from omni_runtime.comm.channel import SyncReceiver; "
            f"r = SyncReceiver({ep!r}); print('bound', flush=True); import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "bound"
        assert os.path.exists(path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert os.path.exists(path)  # a SIGKILLed binder cannot clean up
        assert remove_ipc_dir() == [path]
        assert not os.path.exists(os.path.dirname(path))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
