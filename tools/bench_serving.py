"""Serving benchmark: ``omni-runtime serve`` against diffusers' ``FluxPipeline`` called in-process.

Same checkpoint (``tools/make_tiny_model.py --preset small`` by default), same machine, same run:

(a) latency of one request through serve (HTTP + three stage processes) vs one in-process FluxPipeline call;
(b) throughput with 1, 4 and 16 concurrent clients vs diffusers serving one request at a time;
(c) where the time goes per stage (from the server's /metrics): queue wait (sent -> batch start), compute, and
    the rest of the hop (IPC, batching window, orchestrator).

Usage: ``python tools/bench_serving.py [--preset small] [--size 256x256] [--steps 8] [--quick]``.
Prints a table; ratios matter, absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_model(preset: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from omni_runtime.runtime.model_store import ensure_model

    return ensure_model(str(ROOT / "models" / f"{preset}-flux"))


def bench_diffusers(path: Path, body: dict, repeats: int) -> list[float]:
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(path), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    w, h = (int(x) for x in body["size"].split("x"))

    def once(seed: int) -> float:
        t0 = time.perf_counter()
        pipe(body["prompt"], height=h, width=w, num_inference_steps=body["num_inference_steps"],
             guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
        return time.perf_counter() - t0

    once(0)  # warm-up
    return [once(i) for i in range(repeats)]


class _Server:
    def __init__(self, model: Path, max_batch: int) -> None:
        text = (ROOT / "configs" / "default.toml").read_text()
        text = text.replace('path = "../models/tiny-flux"', f'path = "{model}"')
        text = re.sub(r"max_batch_size = \d+", f"max_batch_size = {max_batch}", text)
        self.tmp = tempfile.TemporaryDirectory(prefix="omni-bench-")
        cfg = Path(self.tmp.name) / "bench.toml"
        cfg.write_text(text)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(self.tmp.name) / "server.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "omni_runtime.runtime.cli", "--log-level", "WARNING", "serve",
                                      str(cfg), "--port", str(self.port)], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server not ready")

    def post(self, body: dict) -> float:
        t0 = time.perf_counter()
        r = httpx.post(self.url + "/v1/images/generations", json=body, timeout=600)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:2000]}")
        return time.perf_counter() - t0

    def metrics(self) -> dict[tuple[str, str], float]:
        out = {}
        for m in re.finditer(r'^(omni_stage_\w+_seconds)_(sum|count){stage="(\w+)"} (\S+)$',
                             httpx.get(self.url + "/metrics").text, re.M):
            out[(f"{m.group(1)}_{m.group(2)}", m.group(3))] = float(m.group(4))
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        self.tmp.cleanup()


def _throughput(server: _Server, body: dict, clients: int, total: int) -> float:
    def one(i: int) -> float:
        return server.post({**body, "seed": i})

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        list(ex.map(one, range(total)))
    return total / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--size", default="256x256")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="fewer repeats and requests")
    p.add_argument("--max-batch", type=int, default=8, help="every stage's max_batch_size (8: the default config)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    repeats = 2 if args.quick else args.repeats
    body = {"prompt": "a photo of a red fox in the snow", "size": args.size, "num_inference_steps": args.steps,
            "seed": 0}
    model = _ensure_model(args.preset)
    base = bench_diffusers(model, body, repeats)
    base_lat = statistics.median(base)
    server = _Server(model, max_batch=args.max_batch)
    try:
        server.post(body)  # warm-up
        m0 = server.metrics()
        lats = [server.post({**body, "seed": i}) for i in range(repeats)]
        m1 = server.metrics()
        lat = statistics.median(lats)
        rows = [("(a) latency, 1 request", f"{base_lat * 1000:.0f} ms", f"{lat * 1000:.0f} ms",
                 f"{lat / base_lat:.2f}x time")]
        base_tput = 1 / base_lat
        for clients in (1, 4, 16):
            total = clients * (2 if args.quick else 4)
            tput = _throughput(server, body, clients, total)
            rows.append((f"(b) throughput, {clients} clients", f"{base_tput:.2f} img/s", f"{tput:.2f} img/s",
                         f"{tput / base_tput:.2f}x"))
        print(f"\nbench_serving: preset {args.preset}, {args.size}, {args.steps} steps, {os.cpu_count()} CPUs, "
              f"median of {repeats}")
        print(f"{'measure':32} {'diffusers':>14} {'omni serve':>14} {'ratio':>12}")
        for r in rows:
            print(f"{r[0]:32} {r[1]:>14} {r[2]:>14} {r[3]:>12}")
        print("\n(c) per stage, single requests (mean per hop)")
        print(f"{'stage':14} {'queue wait':>12} {'compute':>12} {'other (IPC, window, routing)':>30}")
        for stage in ("text_encoder", "denoiser", "vae"):
            def mean(name: str, stage: str = stage) -> float:
                n = m1[(f"{name}_count", stage)] - m0.get((f"{name}_count", stage), 0)
                return (m1[(f"{name}_sum", stage)] - m0.get((f"{name}_sum", stage), 0)) / max(n, 1)

            q, c = mean("omni_stage_queue_wait_seconds"), mean("omni_stage_compute_seconds")
            hop = mean("omni_stage_latency_seconds")
            print(f"{stage:14} {q * 1000:>10.1f}ms {c * 1000:>10.1f}ms {(hop - q - c) * 1000:>28.1f}ms")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
