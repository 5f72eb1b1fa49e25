"""Shared-memory tensor handoff: exact round trips between processes, zero copy, 0600,
unlink-once semantics, forged handles, and sweeping after SIGKILL."""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import psutil
import pytest
import torch
from spawn import run_workers

from omni_runtime.comm import shm_tensor
from omni_runtime.comm.dtypes import TORCH_DTYPES
from omni_runtime.comm.shm_tensor import INSTANCE_ENV, ShmHandle, ShmHandleError, TensorSlot
from omni_runtime.comm.tensor_meta import TensorMeta

_CTX = mp.get_context("forkserver")


@pytest.fixture
def instance(monkeypatch):
    """A fresh runtime-instance id for this test; everything under its prefix is swept afterwards."""
    inst = f"test-{secrets.token_hex(4)}"
    monkeypatch.setenv(INSTANCE_ENV, inst)
    yield inst
    shm_tensor.shutdown()
    shm_tensor.sweep(shm_tensor.instance_prefix(inst), include_live=True)


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    out: dict[str, torch.Tensor] = {}
    for name, dtype in TORCH_DTYPES.items():
        if dtype == torch.bool:
            t = torch.randint(0, 2, (3, 5), generator=g).bool()
        elif dtype.is_floating_point:
            t = (torch.randn(3, 5, generator=g, dtype=torch.float32) * 100).to(dtype)
        elif dtype.is_complex:
            t = torch.randn(3, 5, generator=g, dtype=dtype)
        else:
            info = torch.iinfo(dtype)
            lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
            t = torch.randint(lo, hi, (3, 5), generator=g, dtype=torch.int64).to(dtype)
        out[name] = t
    out["noncontig"] = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()[1:, ::2]
    out["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    out["empty"] = torch.empty(0, 7, dtype=torch.float16)
    out["odd_bytes"] = torch.arange(7, dtype=torch.uint8)  # the next tensor must still be 64-byte aligned
    out["after_odd"] = torch.arange(5, dtype=torch.float32)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality, bit for bit (NaN-safe, works for float8)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _wait_file(path: Path, timeout: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)
    return path.read_bytes()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- round trip between processes


def _producer_consumer(rank, world_size, instance, workdir):
    os.environ[INSTANCE_ENV] = instance
    workdir = Path(workdir)
    if rank == 0:
        handles = {
            "dict": shm_tensor.put(_sample_tensors()),
            "single": shm_tensor.put(torch.arange(12, dtype=torch.int32).reshape(3, 4)),
            "empty": shm_tensor.put(torch.empty(0)),
        }
        _write_atomic(workdir / "handles", msgspec.msgpack.encode(handles))
        _wait_file(workdir / "consumer_done")
        view = shm_tensor.get(handles["single"])  # owner still holds it: the consumer wrote into it
        return {
            "seen_write": int(view[0, 0]),
            "left": [os.path.exists(f"/dev/shm/{h.name}") for h in handles.values()],
        }
    handles = msgspec.msgpack.decode(_wait_file(workdir / "handles"), type=dict[str, ShmHandle])
    got = shm_tensor.get(handles["dict"])
    expected = _sample_tensors()
    result = {
        "keys": list(got),
        "equal": {k: _same(got[k], expected[k]) for k in expected},
        "aligned": [m.offset % 64 == 0 for m in handles["dict"].tensors],
    }
    single = shm_tensor.get(handles["single"])
    result["single"] = single.tolist()
    result["empty_shape"] = list(shm_tensor.get(handles["empty"]).shape)
    single[0, 0] = 99  # visible to the producer: the same pages
    shm_tensor.release(handles["dict"])
    shm_tensor.release(handles["empty"])
    result["still_readable_after_release"] = _same(got["float32"], expected["float32"])
    _write_atomic(workdir / "consumer_done", b"1")
    return result


@pytest.mark.distributed
def test_round_trip_between_processes(instance, tmp_path):
    prod, cons = run_workers(_producer_consumer, 2, args=(instance, str(tmp_path)), timeout=90)
    expected_keys = list(_sample_tensors())
    assert cons["keys"] == expected_keys
    assert cons["equal"] == {k: True for k in expected_keys}
    assert all(cons["aligned"])
    assert cons["single"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert cons["empty_shape"] == [0]
    assert cons["still_readable_after_release"] is True
    assert prod["seen_write"] == 99
    # released by the consumer: dict and empty gone; "single" was not released, so the owner still had it
    assert prod["left"] == [False, True, False]
    # the producer exited normally: its exit unlinked what it still owned
    assert shm_tensor.list_segments(shm_tensor.instance_prefix(instance)) == []


# --------------------------------------------------------------------------- in-process properties


def test_zero_copy_get_shares_the_mapping(instance):
    src = torch.arange(1 << 16, dtype=torch.float32)
    h = shm_tensor.put(src)
    a = shm_tensor.get(h)
    b = shm_tensor.get(h)
    assert torch.equal(a, src) and torch.equal(b, src)
    a[123] = -1.0
    assert b[123].item() == -1.0
    # no copy on get: the tensor's memory is the mapping exported by the mmap object
    ptr = a.data_ptr()
    assert a.untyped_storage().data_ptr() == ptr and a.untyped_storage().nbytes() >= src.nbytes
    assert a.data_ptr() % 64 == 0
    shm_tensor.release(h)
    a[7] = 42.0  # mapping still alive after unlink
    assert b[7].item() == 42.0


def test_put_accepts_autograd_and_conjugate_views(instance):
    w = torch.arange(6.0, requires_grad=True)
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj()  # a lazy conjugate view
    h = shm_tensor.put({"w": w * 2, "z": z})
    got = shm_tensor.get(h)
    assert got["w"].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0] and not got["w"].requires_grad
    assert got["z"].tolist() == [1 - 2j, 3 + 4j]
    shm_tensor.release(h)


def test_segment_mode_is_0600_whatever_the_umask(instance):
    old = os.umask(0)
    try:
        h = shm_tensor.put(torch.ones(4))
    finally:
        os.umask(old)
    st = os.stat(f"/dev/shm/{h.name}")
    assert st.st_mode & 0o777 == 0o600
    assert h.name.startswith(f"omni_{instance}_{os.getpid()}_")
    shm_tensor.release(h)


def test_release_is_idempotent_and_harmless_after_owner_shutdown(instance):
    h1 = shm_tensor.put(torch.ones(3))
    assert shm_tensor.release(h1) is True
    assert shm_tensor.release(h1) is False
    h2 = shm_tensor.put(torch.ones(3))
    view = shm_tensor.get(h2)
    shm_tensor.shutdown()  # the owner unlinks everything it still has
    assert not os.path.exists(f"/dev/shm/{h2.name}")
    assert shm_tensor.release(h2) is False
    assert view.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ShmHandleError, match="does not exist"):
        shm_tensor.get(h2)


def _put_and_exit(instance, workdir):
    os.environ[INSTANCE_ENV] = instance
    h = shm_tensor.put({"x": torch.ones(8)})
    (Path(workdir) / "handle").write_bytes(msgspec.msgpack.encode(h))


def test_owner_exit_unlinks_and_late_release_is_harmless(instance, tmp_path):
    p = _CTX.Process(target=_put_and_exit, args=(instance, str(tmp_path)))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    h = msgspec.msgpack.decode((tmp_path / "handle").read_bytes(), type=ShmHandle)
    assert not os.path.exists(f"/dev/shm/{h.name}")
    assert shm_tensor.release(h) is False


def _forgeries(h: ShmHandle) -> dict[str, tuple[ShmHandle, str]]:
    m = h.tensors[0]
    big = TensorSlot(m.key, TensorMeta(m.meta.dtype, (1 << 20,)), m.offset)

    def meta(**kw):
        return (msgspec.structs.replace(m, meta=msgspec.structs.replace(m.meta, **kw)),)

    return {
        "path traversal": (msgspec.structs.replace(h, name="../../etc/passwd"), "not a segment name"),
        "other pid": (msgspec.structs.replace(h, owner_pid=h.owner_pid + 1), "does not match"),
        "bad dtype": (msgspec.structs.replace(h, tensors=meta(dtype="object")), "dtype"),
        "past the end": (msgspec.structs.replace(h, tensors=(big,)), "inside the segment"),
        "negative dim": (msgspec.structs.replace(h, tensors=meta(shape=(-1, 4))), "out of range"),
        "too many dims": (msgspec.structs.replace(h, tensors=meta(shape=(1,) * 65)), "dimensions"),
        "misaligned": (msgspec.structs.replace(h, tensors=(msgspec.structs.replace(m, offset=4),)), "aligned"),
        "size lie": (msgspec.structs.replace(h, total_bytes=h.total_bytes * 1000,
                                             tensors=(TensorSlot(m.key, TensorMeta(m.meta.dtype, (1000,)), 64_000),)),
                     "has 128 bytes"),
        "two tensors, single": (msgspec.structs.replace(h, tensors=(m, m)), "1 tensor"),
    }


def test_forged_handles_raise_clear_errors(instance):
    h = shm_tensor.put(torch.arange(16, dtype=torch.float32))
    assert h.total_bytes == 128
    for what, (forged, msg) in _forgeries(h).items():
        with pytest.raises(ShmHandleError, match=msg):
            shm_tensor.get(forged)
            pytest.fail(f"forgery {what!r} was accepted")
    with pytest.raises(ShmHandleError):
        shm_tensor.get({"name": h.name})
    # a wire-level forgery with wrong field types never reaches get
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"name": 1, "owner_pid": "x", "total_bytes": 1,
                                                       "tensors": []}), type=ShmHandle)
    assert shm_tensor.get(h).tolist() == list(map(float, range(16)))  # the real one still works


def test_put_rejects_what_it_cannot_carry(instance):
    with pytest.raises(TypeError, match="allowed dtypes"):
        shm_tensor.put(torch.empty(2, dtype=torch.uint1))
    with pytest.raises(TypeError, match="only str keys"):
        shm_tensor.put({1: torch.zeros(2)})
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        shm_tensor.put([torch.zeros(2)])
    assert shm_tensor.list_segments() == []


def test_instance_id_is_validated(monkeypatch):
    monkeypatch.setenv(INSTANCE_ENV, "bad/name")
    with pytest.raises(ValueError, match="OMNI_RUNTIME_INSTANCE"):
        shm_tensor.instance_prefix()


# --------------------------------------------------------------------------- SIGKILL and sweep


def _put_then_sigkill(instance, workdir):
    os.environ[INSTANCE_ENV] = instance
    h = shm_tensor.put({"latents": torch.randn(256, 256)})
    _write_atomic(Path(workdir) / "handle", msgspec.msgpack.encode(h))
    os.kill(os.getpid(), signal.SIGKILL)


def _get_then_wait(instance, workdir):
    os.environ[INSTANCE_ENV] = instance
    h = msgspec.msgpack.decode(_wait_file(Path(workdir) / "handle"), type=ShmHandle)
    t = shm_tensor.get(h)["latents"]
    _write_atomic(Path(workdir) / "mapped", str(float(t.sum())).encode())
    time.sleep(3600)


def _put_and_live(instance, workdir):
    os.environ[INSTANCE_ENV] = instance
    h = shm_tensor.put(torch.ones(4))
    _write_atomic(Path(workdir) / "live_handle", msgspec.msgpack.encode(h))
    time.sleep(3600)


@pytest.mark.distributed
def test_sigkilled_producer_and_consumer_are_swept(instance, tmp_path):
    prefix = shm_tensor.instance_prefix(instance)
    procs = [_CTX.Process(target=f, args=(instance, str(tmp_path)), daemon=True)
             for f in (_put_then_sigkill, _get_then_wait, _put_and_live)]
    try:
        for p in procs:
            p.start()
        producer, consumer, live = procs
        h = msgspec.msgpack.decode(_wait_file(tmp_path / "handle"), type=ShmHandle)
        live_h = msgspec.msgpack.decode(_wait_file(tmp_path / "live_handle"), type=ShmHandle)
        _wait_file(tmp_path / "mapped")
        consumer.kill()
        for p in (producer, consumer):
            p.join(30)
        assert producer.exitcode == -signal.SIGKILL and consumer.exitcode == -signal.SIGKILL
        # nobody released it and its owner could not: it is still there until swept
        assert shm_tensor.list_segments(prefix) == sorted([h.name, live_h.name])

        assert shm_tensor.sweep(prefix, pids=[consumer.pid]) == []  # the consumer owned nothing
        assert shm_tensor.sweep(prefix) == [h.name]  # the live producer's segment is kept
        assert shm_tensor.list_segments(prefix) == [live_h.name]

        live.kill()
        live.join(30)
        assert shm_tensor.sweep(prefix, pids=[live.pid]) == [live_h.name]
        assert shm_tensor.list_segments(prefix) == []
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)


# --------------------------------------------------------------------------- pooled segments


def test_pool_reuses_released_segments_and_rejects_stale_handles(instance):
    pool = shm_tensor.ShmPool()
    a, b, c = (torch.full((1000,), float(i)) for i in range(3))
    h1 = pool.put(a)
    h2 = pool.put(b)  # h1 still in use: a second segment
    assert h1.pooled and h1.name != h2.name
    assert torch.equal(shm_tensor.get(h1), a)
    assert shm_tensor.release(h1) is True
    assert shm_tensor.release(h1) is False  # double release ignored
    h3 = pool.put(c)
    assert (h3.name, h3.generation) == (h1.name, h1.generation + 1)
    with pytest.raises(ShmHandleError, match="stale handle"):
        shm_tensor.get(h1)
    assert shm_tensor.release(h1) is False  # an outdated generation cannot free the new one
    assert torch.equal(shm_tensor.get(h3), c) and torch.equal(shm_tensor.get(h2), b)
    shm_tensor.release(h3)
    small = pool.put(torch.ones(10))  # a free 4 KiB segment is not wasted on 40 bytes
    assert small.name not in (h1.name, h2.name)
    assert sorted(shm_tensor.list_segments()) == sorted([h1.name, h2.name, small.name])
    assert h1.name in shm_tensor._consumer_maps.maps  # the consumer keeps pooled mappings for reuse
    pool.close()
    assert shm_tensor.list_segments() == []
    # ...but not once the owner unlinked them (that would pin their memory)
    other = shm_tensor.ShmPool()
    shm_tensor.release(other.put(torch.ones(3)))
    assert not {h1.name, h2.name} & set(shm_tensor._consumer_maps.maps)
    other.close()


def test_pool_stays_under_max_bytes(instance):
    t = torch.zeros(1000)  # 4000 bytes + 64 header -> 4096-byte segments
    pool = shm_tensor.ShmPool(max_bytes=2 * 4096)
    h1, h2 = pool.put(t), pool.put(t)
    assert h1.total_bytes == 4096 and pool.pooled_bytes == 8192
    h3 = pool.put(t)  # pool full, nothing free: a plain segment that its release unlinks
    assert not h3.pooled and pool.pooled_bytes == 8192 and len(shm_tensor.list_segments()) == 3
    shm_tensor.release(h1)
    shm_tensor.release(h2)
    h4 = pool.put(torch.zeros(2000))  # needs 8064 bytes: evicts both free segments
    assert not os.path.exists(f"/dev/shm/{h1.name}") and not os.path.exists(f"/dev/shm/{h2.name}")
    assert pool.pooled_bytes == h4.total_bytes == 8064
    assert shm_tensor.release(h3) is True and not os.path.exists(f"/dev/shm/{h3.name}")
    pool.close()
    assert shm_tensor.list_segments() == []


def _pooled_producer_consumer(rank, world_size, instance, workdir, rounds):
    os.environ[INSTANCE_ENV] = instance
    workdir = Path(workdir)
    if rank == 0:
        pool = shm_tensor.ShmPool()
        names = []
        for i in range(rounds):
            h = pool.put({"x": torch.arange(4096, dtype=torch.float32) * i, "i": torch.tensor([i])})
            names.append(h.name)
            _write_atomic(workdir / f"h{i}", msgspec.msgpack.encode(h))
            _wait_file(workdir / f"r{i}")
        pool.close()
        return {"distinct_segments": len(set(names))}
    ok = []
    for i in range(rounds):
        h = msgspec.msgpack.decode(_wait_file(workdir / f"h{i}"), type=ShmHandle)
        d = shm_tensor.get(h)
        ok.append(int(d["i"]) == i and torch.equal(d["x"], torch.arange(4096, dtype=torch.float32) * i))
        del d
        shm_tensor.release(h)
        _write_atomic(workdir / f"r{i}", b"1")
    return {"ok": ok}


@pytest.mark.distributed
def test_pool_round_trips_between_processes(instance, tmp_path):
    prod, cons = run_workers(_pooled_producer_consumer, 2, args=(instance, str(tmp_path), 6), timeout=90)
    assert cons["ok"] == [True] * 6
    assert prod["distinct_segments"] == 1  # every round reused the segment the consumer released
    assert shm_tensor.list_segments(shm_tensor.instance_prefix(instance)) == []


@pytest.mark.distributed
def test_sweep_treats_an_unreaped_zombie_as_dead(instance, tmp_path):
    # A direct child (not a forkserver one): nobody reaps it until we wait, so it stays a zombie.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_shm_tensor as t; "
            "t._put_then_sigkill(sys.argv[2], sys.argv[3])")
    p = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), instance, str(tmp_path)],
                         cwd=str(Path(__file__).parent.parent))
    try:
        h = msgspec.msgpack.decode(_wait_file(tmp_path / "handle"), type=ShmHandle)
        deadline = time.monotonic() + 30
        while psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE:  # killed, not reaped yet
            assert time.monotonic() < deadline, "child never became a zombie"
            time.sleep(0.01)
        assert shm_tensor.sweep(shm_tensor.instance_prefix(instance), pids=[p.pid]) == [h.name]
    finally:
        p.kill()
        p.wait(10)
