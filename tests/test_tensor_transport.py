"""comm.tensor_transport / comm.frame_transport: both roads round-trip bit-exact, release frees, death is an error."""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import time

import msgspec
import pytest
import torch

from omni_runtime.comm import frame_transport, shm_tensor, tensor_transport
from omni_runtime.comm.channel import ipc_endpoint, remove_ipc_dir, tcp_endpoint
from omni_runtime.comm.dtypes import TORCH_DTYPES
from omni_runtime.comm.tensor_transport import FrameFetchError, FrameRef, ShmHandle, TensorRef

_CTX = mp.get_context("forkserver")


@pytest.fixture(autouse=True)
def instance(monkeypatch):
    inst = f"tt{secrets.token_hex(4)}"
    monkeypatch.setenv(shm_tensor.INSTANCE_ENV, inst)
    yield inst
    tensor_transport.close()
    shm_tensor.shutdown()
    shm_tensor.sweep(shm_tensor.instance_prefix(inst), include_live=True)
    assert remove_ipc_dir(inst) == []  # every socket file was removed by its owner


def _sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, dtype in TORCH_DTYPES.items():
        if dtype == torch.bool:
            out[name] = torch.randint(0, 2, (3, 70), generator=g).bool()
        elif dtype.is_floating_point or dtype.is_complex:
            out[name] = torch.randint(0, 256, (3, 70 * dtype.itemsize), generator=g, dtype=torch.uint8).view(dtype)
        else:
            out[name] = torch.randint(0, 100, (3, 70), generator=g).to(dtype)
    out["empty"] = torch.zeros(0, 4)
    out["strided"] = torch.arange(64.0).reshape(8, 8).t()  # not contiguous: copied once at publish
    return out


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


class _Msg(msgspec.Struct):
    inputs: TensorRef | None = None


@pytest.mark.parametrize("transport", ["shm", "frames"])
def test_both_roads_round_trip_bit_exact_through_a_message(transport):
    ref_tensors = _sample()
    ref = tensor_transport.publish(ref_tensors, transport)
    assert isinstance(ref, ShmHandle if transport == "shm" else FrameRef)
    msg = msgspec.msgpack.decode(msgspec.msgpack.encode(_Msg(ref)), type=_Msg)  # the union decodes either kind
    assert msg.inputs == ref
    got = tensor_transport.fetch(msg.inputs)
    assert sorted(got) == sorted(ref_tensors)
    for k, t in ref_tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and _bits(got[k]) == _bits(t), k
    tensor_transport.release(msg.inputs)
    single = tensor_transport.publish(torch.arange(10.0), transport)
    assert torch.equal(tensor_transport.fetch(single), torch.arange(10.0))
    tensor_transport.release(single)


def test_release_drops_at_the_producer_and_a_second_fetch_is_a_clear_error():
    server = tensor_transport.serve_frames()
    assert server.endpoint.startswith(f"ipc://{ipc_endpoint('x')[len('ipc://'):].rsplit('/', 1)[0]}/")
    a = tensor_transport.publish({"x": torch.ones(1000)}, "frames")
    b = tensor_transport.publish({"y": torch.zeros(1000)}, "frames")
    assert server.held == 2
    assert a.nbytes == 4000
    tensor_transport.fetch(a)
    tensor_transport.release(a)
    end = time.monotonic() + 5
    while server.held != 1 and time.monotonic() < end:
        time.sleep(0.01)
    assert server.held == 1
    with pytest.raises(FrameFetchError, match=f"key '{a.key}' is not held by the producer"):
        tensor_transport.fetch(a)
    assert torch.equal(frame_transport.fetch(b, release=True)["y"], torch.zeros(1000))  # one round trip
    assert server.held == 0
    with pytest.raises(FrameFetchError, match="not held"):
        frame_transport.fetch(b)


def test_tcp_endpoint_and_bad_input():
    server = frame_transport.TensorServer(tcp_endpoint("127.0.0.1", 0))
    try:
        assert server.endpoint.startswith("tcp://127.0.0.1:") and not server.endpoint.endswith(":0")
        ref = server.publish(torch.arange(100, dtype=torch.int64))
        assert torch.equal(frame_transport.fetch(ref, release=True), torch.arange(100))
        with pytest.raises(FrameFetchError, match="endpoint='http://x' is not allowed"):
            frame_transport.fetch(msgspec.structs.replace(ref, endpoint="http://x"))
        with pytest.raises(FrameFetchError, match="key='../x' is not a key of ours"):
            frame_transport.fetch(msgspec.structs.replace(ref, key="../x"))
        with pytest.raises(TypeError, match="must map a str to a torch.Tensor"):
            server.publish({"a": 1})
        with pytest.raises(ValueError, match="transport='pigeon' is not allowed; allowed: shm, frames"):
            tensor_transport.publish(torch.ones(1), "pigeon")
        with pytest.raises(TypeError, match="expected a ShmHandle or a FrameRef"):
            tensor_transport.fetch("ref")
    finally:
        server.close()
    assert server.held == 0


def _producer(instance: str, conn) -> None:
    os.environ[shm_tensor.INSTANCE_ENV] = instance
    from omni_runtime.comm import tensor_transport as tt

    ref = tt.publish({"latents": torch.arange(4096.0).reshape(64, 64)}, "frames")
    conn.send_bytes(msgspec.msgpack.encode(ref))
    while True:
        cmd = conn.recv_bytes()
        if cmd == b"held?":
            conn.send_bytes(str(tt.serve_frames().held).encode())
        elif cmd == b"die":
            os._exit(9)  # no cleanup at all
        else:
            tt.close()
            return


def test_between_processes_release_and_producer_death(instance):
    parent, child = _CTX.Pipe()
    p = _CTX.Process(target=_producer, args=(instance, child))
    p.start()
    try:
        ref = msgspec.msgpack.decode(parent.recv_bytes(), type=TensorRef)
        assert isinstance(ref, FrameRef) and ref.owner_pid == p.pid
        got = tensor_transport.fetch(ref)
        assert torch.equal(got["latents"], torch.arange(4096.0).reshape(64, 64))
        tensor_transport.release(ref)
        held = None
        for _ in range(100):
            parent.send_bytes(b"held?")
            held = int(parent.recv_bytes())
            if held == 0:
                break
            time.sleep(0.02)
        assert held == 0
        # a second object, then the producer dies before anyone fetched it
        parent.send_bytes(b"die")
        p.join(30)
        assert p.exitcode == 9
        t0 = time.monotonic()
        with pytest.raises(FrameFetchError, match=rf"the producer \(pid {p.pid}, .*\) is gone"):
            tensor_transport.fetch(ref, timeout=30)
        assert time.monotonic() - t0 < 5  # on one node the dead pid is noticed at once, not at the timeout
        # across nodes only the timeout can tell
        remote = msgspec.structs.replace(ref, node="elsewhere|boot|0")
        with pytest.raises(FrameFetchError, match=r"did not answer within 0.5s"):
            tensor_transport.fetch(remote, timeout=0.5)
    finally:
        if p.is_alive():
            p.kill()
        p.join(10)
    # the dead producer's ipc socket file is the only trace; the instance's sweep (remove_ipc_dir) takes it
    assert [n for n in os.listdir("/dev/shm") if n.startswith(shm_tensor.instance_prefix(instance))] == []
    remove_ipc_dir(instance)
