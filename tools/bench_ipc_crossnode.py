"""The cross-node section of ``tools/bench_ipc.py`` (``python tools/bench_ipc.py --cross-node``).

Everything in one run, each next to a baseline from the same run, phases alternated:

(d) A 64 MiB tensor handoff through the frame path (``comm.frame_transport``: the producer's tensor server on
    ``tcp://127.0.0.1``, the consumer's ``fetch`` receives it as zero-copy ZMQ frames) vs plain ZMQ over tcp
    of the same bytes (the consumer asks a ROUTER, which answers with the buffer, zero copy). Time at the
    consumer from the request to the bytes in hand; ratio = plain time / frames time per repetition (median).
    Target >= 0.8x.
(e) One small request through ``Omni`` (what ``serve`` runs, minus HTTP) with the Ray launcher on a private
    instance vs the local launcher, on this one machine: both runtimes up at once, requests alternating, one
    torch thread per rank in both.
    Target: Ray p50 <= 1.1x local p50. Also reported: Ray start-up (``ray.init`` of the private instance) and
    stage start-up (constructing ``Omni`` until every stage is ready, Ray's start-up excluded) for both.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec
import torch
import zmq

from omni_runtime.comm import frame_transport
from omni_runtime.comm.channel import make_socket, new_context

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
_CTX = mp.get_context("forkserver")


# ====================================================================== (d) 64 MiB over tcp


def _producer(nbytes: int, reps: int, conn: Connection) -> None:
    """Publishes a fresh tensor per repetition on a tcp tensor server; also serves the same bytes from a plain
    ROUTER (the baseline). Sends the refs and the ROUTER's endpoint to the consumer; serves until told to stop."""
    src = torch.rand(nbytes // 4, dtype=torch.float32)
    server = frame_transport.TensorServer("tcp://127.0.0.1:*")
    ctx = new_context()
    router = make_socket(zmq.ROUTER, ctx=ctx, bind="tcp://127.0.0.1:*")
    refs = [server.publish(src) for _ in range(reps + 1)]
    conn.send_bytes(msgspec.msgpack.encode({"refs": refs, "plain": router.getsockopt_string(zmq.LAST_ENDPOINT)}))
    view = memoryview(src.numpy()).cast("B")
    while True:
        if router.poll(100):
            ident, _ = router.recv_multipart()
            router.send_multipart([ident, view], copy=False)
        if conn.poll():
            conn.recv_bytes()
            break
    router.close(linger=0)
    ctx.term()
    server.close()


def bench_tcp_handoff(nbytes: int = 64 * MIB, reps: int = 5) -> dict[str, Any]:
    a, b = _CTX.Pipe()
    proc = _CTX.Process(target=_producer, args=(nbytes, reps, b), daemon=True, name="producer")
    proc.start()
    b.close()
    try:
        if not a.poll(120):
            raise TimeoutError("the producer did not start within 120 s")
        setup = msgspec.msgpack.decode(a.recv_bytes())
        refs = [msgspec.convert(r, frame_transport.FrameRef) for r in setup["refs"]]
        ctx = new_context()
        dealer = make_socket(zmq.DEALER, ctx=ctx, connect=setup["plain"])
        frames_s, plain_s = [], []
        for i, ref in enumerate(refs):  # alternate: frames, then plain, per repetition; the first is a warm-up
            t0 = time.perf_counter()
            t = frame_transport.fetch(ref, release=True, timeout=60)
            t1 = time.perf_counter()
            assert t.numel() * 4 == nbytes
            del t
            t2 = time.perf_counter()
            dealer.send(b"go")
            if not dealer.poll(60_000):
                raise TimeoutError("no plain ZMQ answer within 60 s")
            got = dealer.recv(copy=False)
            t3 = time.perf_counter()
            assert len(got.buffer) == nbytes
            del got
            if i:
                frames_s.append(t1 - t0)
                plain_s.append(t3 - t2)
        dealer.close(linger=0)
        ctx.term()
        frame_transport.close_clients()
        a.send_bytes(b"stop")
    finally:
        proc.join(20)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    med = statistics.median
    return {"bytes": nbytes, "reps": reps, "frames_ms": med(frames_s) * 1e3, "plain_ms": med(plain_s) * 1e3,
            "frames_gbps": nbytes / med(frames_s) / 1e9, "plain_gbps": nbytes / med(plain_s) / 1e9,
            "ratio": med(p / f for p, f in zip(plain_s, frames_s, strict=True))}


# ====================================================================== (e) serve latency, Ray vs local


def _config(launcher: str) -> Any:
    from omni_runtime.runtime.config_load import config_from_dict

    # one torch thread per rank in both: the Ray launcher's default (a bundle of threads CPUs); the local launcher
    # would otherwise give every rank all cores, and the comparison would measure OpenMP oversubscription
    one = {"threads": 1}
    raw: dict[str, Any] = {"model": {"path": str(ROOT / "models" / "tiny-flux")},
                           "stages": {"text_encoder": dict(one), "denoiser": dict(one), "vae": dict(one)}}
    if launcher == "ray":
        raw["placement"] = {"launcher": "ray", "ray_address": ""}
    return config_from_dict(raw)


def bench_serve_latency(n: int = 6) -> dict[str, Any]:
    from omni_runtime.runtime import Omni

    out: dict[str, Any] = {}
    t0 = time.monotonic()
    local = Omni(_config("local"))
    out["local_start_s"] = time.monotonic() - t0
    try:
        t0 = time.monotonic()
        ray_omni = Omni(_config("ray"))
        total = time.monotonic() - t0
        try:
            launcher = ray_omni._orch.stages.launcher
            out["ray_init_s"] = launcher.connect_s
            out["ray_stage_start_s"] = total - launcher.connect_s
            lat: dict[str, list[float]] = {"local": [], "ray": []}
            for i in range(n + 1):  # alternate; the first round is a warm-up
                for name, omni in (("local", local), ("ray", ray_omni)):
                    t = time.perf_counter()
                    omni.generate("a small red kite", size="32x32", seed=i, num_inference_steps=1)
                    if i:
                        lat[name].append(time.perf_counter() - t)
        finally:
            ray_omni.close()
    finally:
        local.close()
    med = statistics.median
    out.update(n=n, local_p50_ms=med(lat["local"]) * 1e3, ray_p50_ms=med(lat["ray"]) * 1e3,
               ratio=med(r / c for r, c in zip(lat["ray"], lat["local"], strict=True)))
    return out


def run(quick: bool) -> tuple[dict[str, Any], list[tuple[str, str, bool]]]:
    """Both parts; returns the results and the (target, value, pass) rows."""
    reps, n = (3, 4) if quick else (8, 10)
    print(f"\n(d) 64 MiB handoff over tcp on loopback, median of {reps} (alternating): frame path "
          f"(TensorServer -> fetch) vs plain ZMQ ROUTER/DEALER of the same bytes", flush=True)
    hand = bench_tcp_handoff(64 * MIB, reps)
    print(f"{'road':<12}{'ms':>9}{'GB/s':>8}\n{'frames':<12}{hand['frames_ms']:>9.2f}{hand['frames_gbps']:>8.2f}\n"
          f"{'plain zmq':<12}{hand['plain_ms']:>9.2f}{hand['plain_gbps']:>8.2f}\nratio (plain/frames) "
          f"{hand['ratio']:.2f}x", flush=True)
    print(f"\n(e) one 32x32 1-step request through Omni, Ray launcher (private instance) vs local launcher, "
          f"{n} alternating rounds after a warm-up", flush=True)
    lat = bench_serve_latency(n)
    print(f"  local p50 {lat['local_p50_ms']:.1f} ms, ray p50 {lat['ray_p50_ms']:.1f} ms, ratio "
          f"{lat['ratio']:.2f}x\n  start-up: local stages {lat['local_start_s']:.1f} s; Ray private instance "
          f"{lat['ray_init_s']:.1f} s + Ray stages {lat['ray_stage_start_s']:.1f} s", flush=True)
    targets = [("64 MiB frame handoff over tcp >= 0.8x plain ZMQ tcp", f"{hand['ratio']:.2f}x", hand["ratio"] >= 0.8),
               ("small request latency, Ray launcher <= 1.1x local launcher", f"{lat['ratio']:.2f}x",
                lat["ratio"] <= 1.1)]
    return {"tcp_handoff": hand, "serve_latency": lat, "pid": os.getpid()}, targets
