"""Helper for the server tests (no tests here): start `omni-runtime serve` in a subprocess, stop it, check leftovers."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import psutil
from image_bytes import decode_b64
from serve_process import wait_healthy  # tools/ (on the path from conftest)

from omni_runtime.runtime.launcher import free_port

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-test-omni"
T = TypeVar("T")
#: the denoiser's parallel section as every config in configs/ writes it (all degrees 1): ``denoiser_layout`` edits it
DENOISER_PARALLEL = """[stages.denoiser.parallel]
ulysses = 1
ring = 1
cfg = 1
pp = 1
hsdp_shard = 1
hsdp_replicate = 1"""
#: the ``Server(edits=...)`` that shards the text encoder's weights too (an HSDP layout's other half)
TEXT_ENCODER_HSDP2 = {"[stages.text_encoder]\nreplicas = 1":
                      "[stages.text_encoder]\nreplicas = 1\nparallel = { hsdp_shard = 2 }"}


def config_text(base_config: str, edits: dict[str, str] | None = None) -> str:
    """``configs/<base_config>`` with ``edits`` (old -> new, each must be there) and the embedded models' paths made
    absolute."""
    text = (ROOT / "configs" / base_config).read_text()
    for old, new in (edits or {}).items():
        assert old in text, f"{old!r} not in {base_config}"
        text = text.replace(old, new)
    return text.replace('path = "../models/', f'path = "{ROOT / "models"}/')  # the embedded models


#: the ``config_text`` edits that ask for PipeFusion (pp 2), which a family without it must refuse by name
PIPEFUSION = {"pp = 1": 'pp = 2\npp_mode = "pipefusion"'}


class Server:
    def __init__(self, tmp: Path, base_config: str = "default.toml", extra: str = "", api_key: str = API_KEY,
                 timeout: float = 180.0, max_queue: int = 64, edits: dict[str, str] | None = None) -> None:
        """``edits``: exact text replacements in the base config (each must occur), e.g. a parallel degree."""
        text = config_text(base_config, edits)
        text = text.replace('api_key = ""', f'api_key = "{api_key}"')
        text = text.replace("max_queue = 64", f"max_queue = {max_queue}")
        cfg = tmp / "server.toml"
        cfg.write_text(text + extra)
        self.config_path = cfg
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.instance = f"test{secrets.token_hex(4)}"
        env = {**os.environ, "OMNI_RUNTIME_INSTANCE": self.instance}
        self.log = open(tmp / "server.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "omni_runtime.runtime.cli", "serve", str(cfg), "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.headers = {"Authorization": f"Bearer {api_key}"}
        try:
            wait_healthy(self.proc, self.url, timeout, self.log_text, "test")
        except BaseException:
            self.stop()
            raise

    def finished_video(self, vid: str, timeout_s: float = 200.0) -> dict:
        """The job object of video ``vid`` once it completed (an AssertionError with the log's tail if it failed
        or did not finish within ``timeout_s``)."""
        end = time.time() + timeout_s
        while (job := httpx.get(f"{self.url}/v1/videos/{vid}", headers=self.headers, timeout=30).json())[
                "status"] not in ("completed", "failed"):
            assert time.time() < end, job
            time.sleep(0.05)
        assert job["status"] == "completed", (job, self.log_text()[-3000:])
        return job

    def video_frames(self, vid: str) -> np.ndarray:
        """The finished video ``vid``'s frames (the ``frames`` variant: lossless), (frames, H, W, 3) uint8."""
        from omni_runtime.runtime.video_files import decode_frames

        self.finished_video(vid)
        return decode_frames(httpx.get(f"{self.url}/v1/videos/{vid}/content", params={"variant": "frames"},
                                       headers=self.headers, timeout=60).content)

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (Path(self.log.name)).read_text()

    def stage_procs(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for k in kids:
            try:
                if " ".join(k.cmdline()).startswith("omni-runtime: "):
                    out.append(k)
            except psutil.NoSuchProcess:
                pass
        return out

    def shm_entries(self) -> list[str]:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"omni_{self.instance}-"))

    def held_shm_entries(self) -> list[str]:
        """Segments still held by a request: every one but the free segments a stage's ShmPool keeps for reuse
        (header state byte 2 = released; see ``comm.shm_tensor``)."""
        held = []
        for n in self.shm_entries():
            try:
                with open(f"/dev/shm/{n}", "rb") as f:
                    head = f.read(5)
            except FileNotFoundError:
                continue
            if head[:4] != b"OMNI" or head[4] != 2:
                held.append(n)
        return held

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server, wait for it; kill it (and every descendant) if it does not exit."""
        if self.proc.poll() is None:
            try:
                descendants = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                descendants = []
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for p in descendants + [psutil.Process(self.proc.pid)]:
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
                self.proc.wait(10)
            alive = wait_exited(descendants, timeout=10)
            for p in alive:
                p.kill()
            self.leftover = [p.pid for p in alive]
        self.log.close()
        return self.proc.returncode


def wait_exited(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process of ``procs`` has exited; returns those still running after ``timeout``. An exited
    process whose parent (the server) is gone stays a zombie until this machine's init reaps it, which can take
    seconds: it counts as exited (it holds nothing but its pid), so the wait does not depend on init's pace."""
    end = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() >= end:
            return alive
        time.sleep(0.05)


def shared_steps(server: Server) -> float:
    """Denoiser steps so far that ran more than one request (``omni_denoiser_step_active`` above 1): a request joined
    another's running set (step-level batching)."""
    import re

    text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=10).text
    count = sum(float(m) for m in re.findall(r"^omni_denoiser_step_active_count(?:{[^}]*})? (\S+)$", text, re.M))
    ones = sum(float(m) for m in re.findall(r'^omni_denoiser_step_active_bucket{le="1.0".*} (\S+)$', text, re.M))
    return count - ones


def images_together(server: Server, carrier: dict, joiners: list[dict], timeout: float = 240.0) -> list[np.ndarray]:
    """Run ``joiners`` inside the running set of a long ``carrier`` request and return their images.

    The carrier (the same join key: the joiners' size, or any size under ``mixed_sizes``; hundreds of steps) is
    posted first over a raw socket; once it is denoising (``GET /v1/requests/{id}``: a step done) the joiners are
    posted at once and join its running set at a step boundary, which the denoiser's metrics must show (a step that
    ran more than one request). Then the carrier's client goes away, so it leaves at the next step (cancelled),
    never run to its end. Events, not timing: however slow the machine, the carrier is still running when the
    joiners arrive."""
    import json
    import socket

    from omni_runtime.runtime.requests import parse_request

    parse_request(carrier, allow_unknown=False)  # a carrier the server would refuse fails here, not after a wait
    rid = f"carrier-{secrets.token_hex(4)}"

    def progress() -> dict:
        r = httpx.get(f"{server.url}/v1/requests/{rid}", headers=server.headers, timeout=30)
        return r.json() if r.status_code == 200 else {"status": "unknown", "steps_done": 0}

    before = shared_steps(server)
    data = json.dumps(carrier).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: {server.headers['Authorization']}\r\nX-Request-Id: {rid}\r\n".encode()
                     + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        end = time.monotonic() + timeout
        while progress()["steps_done"] < 1:
            assert time.monotonic() < end, f"the carrier never started denoising: {progress()}"
            time.sleep(0.02)
        with ThreadPoolExecutor(len(joiners)) as ex:
            images = list(ex.map(lambda body: image_of(server, body, timeout), joiners))
        assert progress()["status"] == "running", "the carrier ended before the joiners: give it more steps"
    finally:
        sock.close()  # the carrier's client goes away: it leaves the running set at the next step
    while progress()["status"] == "running":
        assert time.monotonic() < end, progress()
        time.sleep(0.05)
    assert shared_steps(server) - before >= len(joiners), "the joiners did not share the carrier's steps"
    return images


def image_of(server: Server, body: dict, timeout: float = 240.0, rid: str | None = None) -> np.ndarray:
    """POST ``body`` and return its first image (uint8 HxWx3); fails the test on any status but 200. Kill-and-restart
    tests take the image of one request before the kill and compare the restarted replica's image with it."""
    headers = {**server.headers, **({"X-Request-Id": rid} if rid else {})}
    r = httpx.post(server.url + "/v1/images/generations", json=body, headers=headers, timeout=timeout)
    assert r.status_code == 200, r.text
    return decode_b64(r.json()["data"][0]["b64_json"])


def post_and_kill(server: Server, victim: psutil.Process, body: dict, timeout: float = 120.0,
                  busy_cpu_s: float = 1.0) -> tuple[httpx.Response, float]:
    """POST ``body`` and SIGKILL ``victim`` once it has spent ``busy_cpu_s`` of CPU on the request (so the kill lands
    mid-compute whether the machine is busy or quiet); returns the response and the seconds from the kill to it."""
    import threading

    result: dict = {}

    def post() -> None:
        r = httpx.post(server.url + "/v1/images/generations", json=body, headers=server.headers, timeout=timeout)
        result["t"], result["r"] = time.monotonic(), r

    busy_from = victim.cpu_times().user
    t = threading.Thread(target=post)
    t.start()
    end = time.monotonic() + timeout / 2
    while victim.cpu_times().user - busy_from < busy_cpu_s and time.monotonic() < end:
        time.sleep(0.05)
    assert "r" not in result, "the request finished before the kill; make it slower"
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    t.join(timeout)
    return result["r"], result["t"] - killed_at


def denoiser_layout(**degrees: int) -> dict[str, str]:
    """The ``Server(edits=...)`` that sets the denoiser's parallel degrees, e.g. ``denoiser_layout(ulysses=2)``."""
    text = DENOISER_PARALLEL
    for key, value in degrees.items():
        text = text.replace(f"{key} = 1", f"{key} = {value}", 1)
    return {DENOISER_PARALLEL: text}


@contextlib.contextmanager
def serving(tmp: Path, **kw: Any) -> Iterator[Server]:
    """``Server(tmp, **kw)``, stopped on the way out, which then checks that its shm segments are gone."""
    server = Server(tmp, **kw)
    try:
        yield server
    finally:
        server.stop()
        assert server.shm_entries() == []


def at_once(fn: Callable[..., T], calls: Iterable[tuple]) -> list[T]:
    """``fn(*args)`` for every ``args`` of ``calls``, each in its own thread, all started before any is waited for
    (requests that share the denoiser's running set); their results in order. A call that raises fails the test."""
    calls = list(calls)
    with ThreadPoolExecutor(len(calls)) as ex:
        return list(ex.map(lambda args: fn(*args), calls))


def post_together(server: Server, path: str, requests: list[dict], timeout: float = 200.0) -> list[httpx.Response]:
    """POST each of ``requests`` (``httpx.post`` keywords: ``json=``, or ``data=`` and ``files=``) to ``path`` at once
    (:func:`at_once`); fails the test on any status but 200."""
    out = at_once(lambda kw: httpx.post(server.url + path, headers=server.headers, timeout=timeout, **kw),
                  [(kw,) for kw in requests])
    for r in out:
        assert r.status_code == 200, (r.text, server.log_text()[-3000:])
    return out


def assert_logged(server: Server, lines: Iterable[str]) -> None:
    """Every one of ``lines`` stands in the server's log (the ranks of a layout really ran it)."""
    log = server.log_text()
    for line in lines:
        assert line in log, (line, log[-3000:])
