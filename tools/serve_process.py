"""``omni-runtime serve`` as a subprocess for the benchmarks: a config edited from the default one, start, wait for
``/health``, post requests the way a real client does, read ``/metrics`` and the processes' CPU time, stop.

Requests go through one persistent ``httpx.Client`` per calling thread (keep-alive), as the OpenAI SDK and any
long-lived client send them. ``httpx.post`` would build a new client per call: its TLS context alone costs ~20 ms
of CPU per request on the 2-core VM, which the serve side of a benchmark would then pay and diffusers not.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

from omni_runtime.runtime.launcher import free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, log_text: Callable[[], str],
                 name: str = "serve") -> None:
    """Return once ``url``'s ``/health`` answers 200; RuntimeError with the log's tail when ``proc`` exits first or
    ``timeout_s`` passes (the caller stops the process). The benchmarks and the server tests start serve alike."""
    end = time.monotonic() + timeout_s
    # polled every 50 ms (a coarser poll adds half its period to each of the test suite's many server starts),
    # through one client (a new one per poll would cost ~20 ms of CPU each, taken from the starting server)
    with httpx.Client(timeout=1) as client:
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} server exited with {proc.returncode}:\n{log_text()[-4000:]}")
            try:
                if client.get(url + "/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"{name} server not ready within {timeout_s:.0f}s:\n{log_text()[-4000:]}")


def ensure_model(preset: str, family: str = "flux") -> Path:
    """The embedded model ``<preset>-<family>`` (e.g. ``small-flux``, ``tiny-qwen-image``: the names of
    ``runtime.model_store.GENERATED_NAMES``) under ``models/``, made on first use (no download)."""
    from omni_runtime.runtime.model_store import ensure_model as ensure

    return ensure(str(ROOT / "models" / f"{preset}-{family}"))


def config_text(model: Path, max_batch: int = 0, edit: Callable[[str], str] | None = None) -> str:
    """configs/default.toml pointing at ``model``; ``max_batch`` > 0 sets every stage's ``max_batch_size``."""
    text = (ROOT / "configs" / "default.toml").read_text()
    text = text.replace('path = "../models/tiny-flux"', f'path = "{model}"')
    if max_batch > 0:
        text = re.sub(r"max_batch_size = \d+", f"max_batch_size = {max_batch}", text)
    return edit(text) if edit is not None else text


class ServeProcess:
    """One server process on a free port; :meth:`stop` ends it (SIGTERM, then SIGKILL) and removes its files."""

    def __init__(self, config: str, name: str = "bench", env: dict[str, str] | None = None,
                 timeout_s: float = 300, post_timeout_s: float = 900) -> None:
        self.name, self.post_timeout_s = name, post_timeout_s
        self.tmp = tempfile.TemporaryDirectory(prefix=f"omni-{name}-")
        cfg = Path(self.tmp.name) / "bench.toml"
        cfg.write_text(config)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(Path(self.tmp.name) / "server.log", "w")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "omni_runtime.runtime.cli", "--log-level", "WARNING",
                                      "serve", str(cfg), "--port", self.url.rsplit(":", 1)[1]], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        wait_healthy(self.proc, self.url, timeout_s, lambda: Path(self.log.name).read_text(), self.name)

    def client(self) -> httpx.Client:
        """This thread's keep-alive client."""
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = httpx.Client(base_url=self.url, timeout=self.post_timeout_s)
            with self._lock:
                self._clients.append(c)
        return c

    def post(self, body: dict) -> float:
        """One generation request; its latency in seconds (an error status raises)."""
        t0 = time.perf_counter()
        r = self.client().post("/v1/images/generations", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:2000]}")
        return time.perf_counter() - t0

    def metrics_text(self) -> str:
        return self.client().get("/metrics").text

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user + system, every thread) so far of the frontend and of every stage rank, by name."""
        out: dict[str, float] = {}
        front = psutil.Process(self.proc.pid)
        for proc in [front, *front.children(recursive=True)]:
            try:
                title = " ".join(proc.cmdline()).strip()
                t = proc.cpu_times()
            except psutil.Error:
                continue
            if proc is front:
                name = "frontend"
            elif title.startswith("omni-runtime: "):
                name = title.removeprefix("omni-runtime: ").split()[0]
            else:
                continue  # the forkserver
            out[name] = out.get(name, 0.0) + t.user + t.system
        return out

    def stop(self) -> None:
        for c in self._clients:
            c.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
        self.tmp.cleanup()
