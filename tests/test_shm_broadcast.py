"""MessageQueue / ShmRingBuffer: one writer, local (shm) and remote (tcp) readers, in real processes.

Rank 0 is always the writer. The handle reaches the readers as msgspec bytes in a gloo tensor
broadcast (no pickle). Every test runs under its own runtime-instance prefix and asserts that no
``/dev/shm`` entry with that prefix is left behind.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import torch
from spawn import run_workers

from omni_runtime.comm.instance import run_dir_path
from omni_runtime.comm.shm_broadcast import (
    HAS_FUTEX,
    Handle,
    MessageQueue,
    MessageQueueCancelled,
    MessageQueueTimeout,
    ShmRingBuffer,
)

ROOT = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")


# ----------------------------------------------------------------------------- helpers (run in workers)


def _share_handle(mq: MessageQueue | None) -> Handle:
    """Rank 0 sends its queue's handle to every rank as msgspec bytes in a tensor broadcast."""
    import torch.distributed as dist

    if mq is not None:
        payload = msgspec.msgpack.encode(mq.export_handle())
        size = torch.tensor([len(payload)], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if mq is not None else torch.empty(
        int(size), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return msgspec.msgpack.decode(data.numpy().tobytes(), type=Handle)


def _open(rank: int, world_size: int, n_local: int, instance: str, chunk_bytes: int = 1 << 12,
          chunks: int = 8, wake: str = "futex") -> MessageQueue:
    """Writer on rank 0; ranks 1..n_local read the ring; the rest are remote (tcp on 127.0.0.1).

    ``wake`` picks the writer's wake-up mechanism for sleeping local readers: "futex" or "zmq".
    """
    os.environ["OMNI_RUNTIME_INSTANCE"] = instance
    MessageQueue.use_futex = wake == "futex"
    if rank == 0:
        mq = MessageQueue(world_size - 1, n_local, list(range(1, n_local + 1)), chunk_bytes, chunks,
                          connect_ip="127.0.0.1")
        _share_handle(mq)
    else:
        mq = MessageQueue.create_from_handle(_share_handle(None), rank)
    mq.wait_until_ready(timeout=30)
    return mq


def _segments(instance: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM) if n.startswith(f"omni_{instance}_"))


WAKE = [pytest.param("futex", marks=pytest.mark.skipif(not HAS_FUTEX, reason="no futex(2) here")), "zmq"]


@pytest.fixture(params=WAKE)
def wake(request, monkeypatch):
    """Run a test with each wake-up mechanism for sleeping local readers (and a writer on a full ring)."""
    monkeypatch.setattr(MessageQueue, "use_futex", request.param == "futex")
    return request.param


@pytest.fixture
def instance():
    inst = f"mqtest{secrets.token_hex(4)}"
    yield inst
    assert _segments(inst) == []
    # sockets a killed writer left in the instance's run directory (a live runtime's sweep_dead does this)
    shutil.rmtree(run_dir_path(inst), ignore_errors=True)


# ----------------------------------------------------------------------------- in-process tests


def test_handle_roundtrips_through_msgspec(instance, monkeypatch):
    monkeypatch.setenv("OMNI_RUNTIME_INSTANCE", instance)
    with MessageQueue(3, 2, local_reader_ranks=[4, 7], max_chunk_bytes=1024, max_chunks=3,
                      connect_ip="127.0.0.1") as mq:
        h = mq.export_handle()
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(h), type=Handle) == h
        assert msgspec.json.decode(msgspec.json.encode(h), type=Handle) == h
        assert h.local_reader_ranks == (4, 7) and h.n_reader == 3
        assert h.remote_addr.startswith("tcp://127.0.0.1:")
        seg = SHM / h.buffer_name
        assert h.buffer_name.startswith(f"omni_{instance}_")
        assert seg.stat().st_mode & 0o777 == 0o600
        # data + int32 words (2 readers, writer, closed) + one row (written + 2 read flags) per chunk
        assert seg.stat().st_size == 3 * 1024 + 4 * (2 + 2) + 3 * 3
    assert _segments(instance) == []


def test_local_sockets_live_in_the_instance_run_dir(instance, monkeypatch):
    # issue 14 #16: no abstract-namespace socket (any local user could connect); a path in a 0700 directory
    monkeypatch.setenv("OMNI_RUNTIME_INSTANCE", instance)
    monkeypatch.setattr(MessageQueue, "use_futex", False)  # the zmq wake-up socket exists too
    run_dir = run_dir_path(instance)
    with MessageQueue(1, 1) as mq:
        h = mq.export_handle()
        for addr in (h.local_wake_addr, h.local_overflow_addr):
            assert addr.startswith(f"ipc://{run_dir}/"), addr
            assert "@" not in addr
            assert stat.S_ISSOCK(os.stat(addr[len("ipc://"):]).st_mode)
        st = os.stat(run_dir)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert not os.path.exists(h.local_wake_addr[len("ipc://"):])
    assert not run_dir.exists()  # the writer created it, so it removed it once empty


def test_bad_arguments_name_the_field(instance, monkeypatch):
    monkeypatch.setenv("OMNI_RUNTIME_INSTANCE", instance)
    with pytest.raises(ValueError, match=r"n_local_reader=3 .*\[0, n_reader=2\]"):
        MessageQueue(2, 3)
    with pytest.raises(ValueError, match=r"local_reader_ranks=\[1, 1\]"):
        MessageQueue(2, 2, local_reader_ranks=[1, 1])
    with pytest.raises(ValueError, match=r"max_chunk_bytes=100 .*multiple of 64"):
        ShmRingBuffer(1, 100, 4)
    with pytest.raises(ValueError, match="not a ring-buffer segment name"):
        ShmRingBuffer(1, 64, 4, name="../etc/passwd")
    with MessageQueue(1, 1, max_chunk_bytes=64, max_chunks=2) as mq:
        with pytest.raises(ValueError, match=r"rank=5 is not in local_reader_ranks=\[0\]"):
            MessageQueue.create_from_handle(mq.export_handle(), 5)
        with pytest.raises(RuntimeError, match="only available on readers"):
            mq.dequeue()
        with pytest.raises(RuntimeError, match=r"enqueue\(\) before wait_until_ready\(\)"):
            mq.enqueue(1)
        mq._ring.unlink()  # what wait_until_ready() does once every reader attached
        with pytest.raises(FileNotFoundError, match="create every reader before that"):
            MessageQueue.create_from_handle(mq.export_handle(), 0)
    assert _segments(instance) == []


def test_writer_blocked_on_full_ring_is_cancelled_and_times_out(instance, wake, monkeypatch, caplog):
    """Threads in one process: a reader that never reads fills the ring; timeout names it; shutdown cancels."""
    monkeypatch.setenv("OMNI_RUNTIME_INSTANCE", instance)
    monkeypatch.setattr(MessageQueue, "warn_interval", 0.1)
    w = MessageQueue(1, 1, local_reader_ranks=[3], max_chunk_bytes=256, max_chunks=2)
    r = MessageQueue.create_from_handle(w.export_handle(), 3)
    t = threading.Thread(target=r.wait_until_ready, args=(10,))
    t.start()
    w.wait_until_ready(timeout=10)
    t.join()
    w.enqueue(0)
    w.enqueue(1)
    t0 = time.monotonic()
    with pytest.raises(MessageQueueTimeout, match=r"not been read by reader rank\(s\) \[3\]"):
        w.enqueue(2, timeout=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2.0
    assert r.dequeue() == 0 and r.dequeue() == 1
    w.enqueue(2, timeout=1)
    w.enqueue(3, timeout=1)
    shut = threading.Event()

    def shutdown_after_two_warnings() -> None:  # on events, not the clock: the writer has waited and warned twice
        while sum("still waiting" in r.getMessage() for r in caplog.records) < 2:
            time.sleep(0.01)
        shut.set()
        w.shutdown()

    with caplog.at_level("WARNING", logger="omni_runtime.comm.shm_broadcast"), pytest.raises(MessageQueueCancelled):
        threading.Thread(target=shutdown_after_two_warnings, daemon=True).start()
        w.enqueue(4)  # timeout=None: waits, warning every warn_interval, until shutdown()
    assert shut.is_set()  # it waited until shutdown() (and then raised: the test's timeout bounds the wait)
    warnings = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert len(warnings) >= 2 and all("reader rank(s) [3] to read chunk 0" in m for m in warnings), warnings
    assert [r.dequeue(timeout=1), r.dequeue(timeout=1)] == [2, 3]
    w.close()
    r.close()


def test_reader_waiting_for_an_overflow_payload_notices_a_dead_writer(instance, monkeypatch):
    """The writer dies after announcing an overflow chunk but before ZMQ delivered its payload: the local
    reader must raise Cancelled (like any blocked reader of a dead writer) instead of waiting forever."""
    monkeypatch.setenv("OMNI_RUNTIME_INSTANCE", instance)
    w = MessageQueue(1, 1, max_chunk_bytes=256, max_chunks=2)
    r = MessageQueue.create_from_handle(w.export_handle(), 0)
    t = threading.Thread(target=r.wait_until_ready, args=(10,))
    t.start()
    w.wait_until_ready(timeout=10)
    t.join()
    assert r._writer_pid == os.getpid()  # the writer (this process) is watched while alive
    monkeypatch.setattr(w._overflow, "send_multipart", lambda *a, **k: None)  # the payload never leaves
    w.enqueue("x" * 1000)  # > 256 bytes: only the overflow marker reaches the ring
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    r._writer_pid = dead.pid  # stands in for the writer having been SIGKILLed
    outcome: dict = {}

    def read() -> None:
        t0 = time.monotonic()
        try:
            outcome["got"] = r.dequeue()
        except MessageQueueCancelled as e:
            outcome["err"], outcome["took"] = str(e), time.monotonic() - t0

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # the bug: blocked for good; unblock it so the test fails instead of hanging
        r.shutdown()
        reader.join(10)
    assert outcome.get("err") == f"the writer process (pid {dead.pid}) exited; no more messages will arrive", outcome
    assert outcome["took"] < 3.0
    w.close()
    r.close()


def test_tensors_round_trip_inline_and_overflow(instance, wake, monkeypatch):
    """Local (ring, inline and overflow) and remote readers get bit-exact tensors and arrays back."""
    import numpy as np

    monkeypatch.setenv("OMNI_RUNTIME_INSTANCE", instance)
    w = MessageQueue(2, 1, local_reader_ranks=[1], max_chunk_bytes=4096, max_chunks=2, connect_ip="127.0.0.1")
    readers = [MessageQueue.create_from_handle(w.export_handle(), rank) for rank in (1, 2)]
    threads = [threading.Thread(target=r.wait_until_ready, args=(10,)) for r in readers]
    for t in threads:
        t.start()
    w.wait_until_ready(timeout=10)
    for t in threads:
        t.join()
    g = torch.Generator().manual_seed(0)
    msgs = []
    for numel in (0, 3, 300, 3000):  # 3000 floats: 12 KiB, 3x the chunk -> overflow
        base = torch.randn(numel * 2, generator=g)
        msgs.append({
            "bf16": base[:numel].to(torch.bfloat16),
            "strided": base[::2],  # non-contiguous
            "i64": torch.arange(numel, dtype=torch.int64) - 7,
            "mask": base[:numel] > 0,
            "scalar": torch.tensor(3.5),
            "np": np.linspace(0, 1, numel),
            "nested": [{"k": numel}, "text", None, 1.5],
        })
    got: dict[int, list] = {1: [], 2: []}

    def read(r):
        got[r.rank] = [r.dequeue(timeout=10) for _ in msgs]

    threads = [threading.Thread(target=read, args=(r,)) for r in readers]
    for t in threads:
        t.start()
    for m in msgs:
        w.enqueue(m, timeout=10)
    for t in threads:
        t.join()
    for rank in (1, 2):
        for want, have in zip(msgs, got[rank], strict=True):
            for key in ("bf16", "strided", "i64", "mask", "scalar"):
                assert have[key].dtype == want[key].dtype and torch.equal(have[key], want[key]), (rank, key)
            assert np.array_equal(have["np"], want["np"]) and have["np"].dtype == np.float64
            assert have["nested"] == want["nested"]
    w.close()
    for r in readers:
        r.close()


# ----------------------------------------------------------------------------- in order, many readers


def _in_order_worker(rank, world_size, n_local, n_messages, instance):
    mq = _open(rank, world_size, n_local, instance, chunk_bytes=256, chunks=16)
    if rank == 0:
        assert _segments(instance) == []  # unlinked as soon as every reader attached
        t0 = time.perf_counter()
        for i in range(n_messages):
            mq.enqueue((i, i * 7919 % 1009))
        elapsed = time.perf_counter() - t0
        mq.close()
        return {"elapsed": elapsed}
    bad = []
    for i in range(n_messages):
        got = mq.dequeue(timeout=30)
        if got != [i, i * 7919 % 1009] and len(bad) < 5:
            bad.append((i, got))
    mq.close()
    return {"bad": bad, "late": mq.num_late_wakeups}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("n_local", [1, 3, 7])
def test_every_reader_gets_10000_messages_in_order(n_local, instance):
    n = 10_000
    world = 1 + n_local + 1  # writer, local readers, one remote reader
    out = run_workers(_in_order_worker, world, args=(n_local, n, instance), timeout=120, init_process_group=True)
    assert [o["bad"] for o in out[1:]] == [[]] * (world - 1)
    assert [o["late"] for o in out[1:]] == [0] * (world - 1)
    print(f"\n{n_local} local + 1 remote readers: {n} messages in {out[0]['elapsed']:.2f}s "
          f"({n / out[0]['elapsed']:.0f} msg/s)")


# ----------------------------------------------------------------------------- overflow + random sleeps


def _payload(i: int, chunk_bytes: int) -> dict:
    big = i % 3 == 0
    n = 4 * chunk_bytes // 4 if big else 8  # float32: big ones are 4x the chunk size
    return {"i": i, "t": torch.arange(n, dtype=torch.float32) + i, "tag": "big" if big else "small"}


def _overflow_worker(rank, world_size, n_local, n_messages, instance, wake):
    chunk = 1024
    mq = _open(rank, world_size, n_local, instance, chunk_bytes=chunk, chunks=4, wake=wake)
    rng = random.Random(0)
    if rank == 0:
        for i in range(n_messages):
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0, 4e-3))  # > spin window (1 ms) about 3 times in 8
            msg = _payload(i, chunk)
            msg["sent"] = time.monotonic()
            mq.enqueue(msg)
        mq.close()
        return {}
    ok = 0
    lat = []
    for i in range(n_messages):
        got = mq.dequeue(timeout=30)
        lat.append(time.monotonic() - got.pop("sent"))
        want = _payload(i, chunk)
        ok += (got["i"] == i and got["tag"] == want["tag"] and torch.equal(got["t"], want["t"]))
    mq.close()
    lat.sort()
    return {"ok": ok, "blocks": mq.num_blocks, "late": mq.num_late_wakeups, "p50_us": lat[len(lat) // 2] * 1e6}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("wake", WAKE)
def test_overflow_payloads_and_random_sleeps(instance, wake):
    n = 300
    out = run_workers(_overflow_worker, 5, args=(3, n, instance, wake), timeout=120, init_process_group=True)
    assert [o["ok"] for o in out[1:]] == [n] * 4
    # Local readers passed from spinning to blocking and back: some waits blocked, not all of them.
    for o in out[1:4]:
        assert 0 < o["blocks"] < n, o
        assert o["late"] == 0, o  # every blocked wait was ended by the writer's ping, never by the poll timeout
    print(f"\n{wake}: per-reader p50 latency with random gaps (us):", [round(o["p50_us"]) for o in out[1:]])


# ----------------------------------------------------------------------------- a dead reader


_DOOMED_READER = """
import sys
import msgspec
from omni_runtime.comm.shm_broadcast import Handle, MessageQueue
h = msgspec.msgpack.decode(bytes.fromhex(sys.argv[1]), type=Handle)
mq = MessageQueue.create_from_handle(h, 1)
mq.wait_until_ready(timeout=60)
got = [mq.dequeue(timeout=30) for _ in range(5)]
assert got == list(range(5)), got
print("read5", flush=True)
sys.stdin.read()  # hang until killed
"""


def _dead_reader_worker(rank, world_size, instance, chunks):
    os.environ["OMNI_RUNTIME_INSTANCE"] = instance
    if rank == 0:
        mq = MessageQueue(2, 2, [1, 2], max_chunk_bytes=256, max_chunks=chunks)
        _share_handle(mq)
        mq.wait_until_ready(timeout=60)
        sent = 0
        t0 = time.monotonic()
        try:
            while True:
                mq.enqueue(sent, timeout=2.0)
                sent += 1
        except MessageQueueTimeout as e:
            err = str(e)
        took = time.monotonic() - t0
        mq.close()
        return {"sent": sent, "err": err, "took": took}
    handle = _share_handle(None)
    if rank == 1:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            [sys.executable, "-c", _DOOMED_READER, msgspec.msgpack.encode(handle).hex()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=ROOT,
        )
        try:
            line = proc.stdout.readline()
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            rc = proc.wait(timeout=10)
        return {"line": line.decode().strip(), "rc": rc}
    mq = MessageQueue.create_from_handle(handle, 2)
    mq.wait_until_ready(timeout=60)
    expect = 5 + chunks
    got = [mq.dequeue(timeout=60) for _ in range(expect)]
    try:
        extra = mq.dequeue(timeout=0.5)
    except MessageQueueTimeout:
        extra = None
    mq.close()
    return {"got": got, "extra": extra}


@pytest.mark.distributed
@pytest.mark.slow
def test_killed_reader_makes_writer_time_out_with_clear_error(instance):
    chunks = 4
    w, doomed, healthy = run_workers(_dead_reader_worker, 3, args=(instance, chunks), timeout=120,
                                     init_process_group=True)
    assert doomed == {"line": "read5", "rc": -signal.SIGKILL}
    # The dead reader read 5; the ring then holds `chunks` messages it never reads.
    assert w["sent"] == 5 + chunks
    assert "chunk 1 has not been read by reader rank(s) [1]" in w["err"]
    assert healthy == {"got": list(range(5 + chunks)), "extra": None}


# ----------------------------------------------------------------------------- shutdown, idle CPU


def _shutdown_worker(rank, world_size, instance, wake):
    import torch.distributed as dist

    mq = _open(rank, world_size, 1, instance, wake=wake)
    result = {}
    if rank != 0:
        stamp = {}

        def stop():
            time.sleep(0.3)
            stamp["t"] = time.monotonic()
            mq.shutdown()

        t = threading.Thread(target=stop)
        t.start()
        try:
            mq.dequeue()
            result["raised"] = None
        except MessageQueueCancelled:
            result["raised"] = "cancelled"
            result["latency"] = time.monotonic() - stamp["t"]
        t.join()
        try:
            mq.dequeue(timeout=5)
        except MessageQueueCancelled:
            result["after"] = "cancelled"
    dist.barrier()
    mq.close()
    return result


@pytest.mark.distributed
@pytest.mark.parametrize("wake", WAKE)
def test_shutdown_cancels_a_blocked_dequeue(instance, wake):
    out = run_workers(_shutdown_worker, 3, args=(instance, wake), timeout=60, init_process_group=True)
    for o in out[1:]:  # one local, one remote reader
        assert o["raised"] == "cancelled" and o["after"] == "cancelled"
        assert o["latency"] < 1.0, o
    print(f"\n{wake}: shutdown -> Cancelled latency (ms):", [round(o["latency"] * 1e3, 2) for o in out[1:]])


def _writer_close_worker(rank, world_size, instance, n):
    mq = _open(rank, world_size, 1, instance, chunk_bytes=256, chunks=4)
    if rank == 0:
        for i in range(n):
            mq.enqueue({"i": i, "pad": "x" * (1000 if i % 10 == 0 else 1)})  # some overflow too
        mq.close()  # readers may still be behind: they must get everything, then "closed"
        return {}
    got = [mq.dequeue(timeout=30)["i"] for _ in range(n)]
    t0 = time.monotonic()
    try:
        mq.dequeue(timeout=30)
        err = None
    except MessageQueueCancelled as e:
        err = str(e)
    took = time.monotonic() - t0
    mq.close()
    return {"got": got, "err": err, "took": took}


@pytest.mark.distributed
def test_readers_drain_then_learn_that_the_writer_closed(instance):
    n = 200
    out = run_workers(_writer_close_worker, 3, args=(instance, n), timeout=60, init_process_group=True)
    for o in out[1:]:  # one local, one remote reader
        assert o["got"] == list(range(n))
        assert o["err"] == "the writer closed the queue; no more messages will arrive"
        assert o["took"] < 5.0, o
    print("\nreader learned of close after (s):", [round(o["took"], 3) for o in out[1:]])


def _idle_worker(rank, world_size, instance, idle_s, wake):
    import psutil

    mq = _open(rank, world_size, 2, instance, wake=wake)
    if rank == 0:
        time.sleep(idle_s)
        mq.enqueue(time.monotonic())
        mq.close()
        return {}
    proc = psutil.Process()
    c0, p0, t0 = time.process_time(), sum(proc.cpu_times()[:2]), time.monotonic()
    sent = mq.dequeue(timeout=30)
    now = time.monotonic()
    cpu = time.process_time() - c0
    ps_cpu = sum(proc.cpu_times()[:2]) - p0
    mq.close()
    return {"cpu_frac": cpu / (now - t0), "psutil_frac": ps_cpu / (now - t0), "wall": now - t0,
            "wake_ms": (now - sent) * 1e3, "late": mq.num_late_wakeups}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("wake", WAKE)
def test_idle_reader_uses_almost_no_cpu(instance, wake):
    idle = 2.5  # not a multiple of the 1 s safety poll, so the ping (not the poll timeout) must wake it
    out = run_workers(_idle_worker, 4, args=(instance, idle, wake), timeout=60, init_process_group=True)
    for o in out[1:]:  # two local readers, one remote
        assert o["wall"] >= idle * 0.9
        assert o["cpu_frac"] < 0.02 and o["psutil_frac"] < 0.02, o
        assert o["late"] == 0 and o["wake_ms"] < 500, o  # woken by the writer's ping, not the 1 s poll
    print(f"\n{wake}: idle CPU (% of a core):", [round(o["cpu_frac"] * 100, 3) for o in out[1:]],
          "wake-up latency (ms):", [round(o["wake_ms"], 2) for o in out[1:]])


# ----------------------------------------------------------------------------- close and reopen


def _reopen_worker(rank, world_size, instance, rounds, n):
    import torch.distributed as dist

    os.environ["OMNI_RUNTIME_INSTANCE"] = instance
    group = dist.new_group(list(range(world_size)), backend="gloo")
    names, sums = [], []
    for r in range(rounds):
        writer = r % world_size  # also a writer that is not group rank 0
        mq = MessageQueue.create_from_process_group(group if r % 2 else None, max_chunk_bytes=512, max_chunks=4,
                                                    writer_rank=writer, timeout=30)
        if rank == writer:
            assert mq.local_reader_ranks == tuple(x for x in range(world_size) if x != writer)
            names.append(mq.export_handle().buffer_name)
            for i in range(n):
                mq.broadcast_object({"round": r, "i": i})
            sums.append(None)
        else:
            got = [mq.broadcast_object() for _ in range(n)]
            sums.append(sum(g["i"] for g in got if g["round"] == r))
        mq.close()
        dist.barrier()
        assert _segments(instance) == [], _segments(instance)
    return {"names": names, "sums": sums}


@pytest.mark.distributed
def test_close_and_reopen_leaves_no_segments(instance):
    rounds, n = 3, 200
    out = run_workers(_reopen_worker, 3, args=(instance, rounds, n), timeout=60, init_process_group=True)
    names = [name for o in out for name in o["names"]]
    assert len(set(names)) == rounds
    expect = n * (n - 1) // 2
    assert [o["sums"] for o in out] == [[None if r % 3 == rank else expect for r in range(rounds)]
                                        for rank in range(3)]


# ----------------------------------------------------------------------------- remote back-pressure, dead writer


def test_slow_remote_reader_applies_back_pressure_without_loss(instance, monkeypatch):
    """A remote reader that stops reading makes enqueue wait and time out; nothing is dropped."""
    import numpy as np

    monkeypatch.setenv("OMNI_RUNTIME_INSTANCE", instance)
    w = MessageQueue(1, 0, max_chunk_bytes=1024, max_chunks=2, connect_ip="127.0.0.1")
    r = MessageQueue.create_from_handle(w.export_handle(), 1)
    t = threading.Thread(target=r.wait_until_ready, args=(10,))
    t.start()
    w.wait_until_ready(timeout=10)
    t.join()
    block = np.arange(1 << 14, dtype=np.float32)  # 64 KiB per message
    sent = 0
    with pytest.raises(MessageQueueTimeout, match="remote reader's queue stayed full"):
        while sent < 100_000:
            w.enqueue({"i": sent, "a": block + sent}, timeout=0.3)
            sent += 1
    assert 2 * w.remote_hwm <= sent < 2_000
    got = [r.dequeue(timeout=5) for _ in range(sent)]
    assert [g["i"] for g in got] == list(range(sent))
    assert all(np.array_equal(g["a"], block + g["i"]) for g in got)
    w.enqueue({"i": sent, "a": block}, timeout=5)  # room again
    assert r.dequeue(timeout=5)["i"] == sent
    w.close()
    r.close()


_DOOMED_WRITER = """
import sys
import msgspec
from omni_runtime.comm.shm_broadcast import MessageQueue
mq = MessageQueue(1, 1, [1], max_chunk_bytes=256, max_chunks=4)
print(msgspec.msgpack.encode(mq.export_handle()).hex(), flush=True)
mq.wait_until_ready(timeout=60)
mq.enqueue("hello")
sys.stdin.read()  # hang until killed
"""


@pytest.mark.slow
def test_blocked_reader_notices_a_killed_writer(instance):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMNI_RUNTIME_INSTANCE=instance)
    proc = subprocess.Popen([sys.executable, "-c", _DOOMED_WRITER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        handle = msgspec.msgpack.decode(bytes.fromhex(proc.stdout.readline().decode()), type=Handle)
        r = MessageQueue.create_from_handle(handle, 1)
        r.wait_until_ready(timeout=60)
        assert r.dequeue(timeout=30) == "hello"
        proc.kill()
        proc.wait(timeout=10)
        t0 = time.monotonic()
        with pytest.raises(MessageQueueCancelled, match=rf"writer process \(pid {proc.pid}\) exited"):
            r.dequeue()
        assert time.monotonic() - t0 < 3.0
        r.close()
    finally:
        proc.kill()
        proc.wait(timeout=10)
