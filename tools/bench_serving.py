"""Serving benchmark: ``omni-runtime serve`` against the model family's diffusers pipeline called in-process.

Same checkpoint (the embedded ``small`` preset of ``--family`` flux by default; ``--family qwen-image`` for
Qwen-Image), same machine, same run; the baseline is the pipeline class the directory's ``model_index.json`` names
(``FluxPipeline``, ``QwenImagePipeline``), loaded with diffusers' ``DiffusionPipeline.from_pretrained``:

(a) latency of one request through serve (HTTP + three stage processes) vs one in-process pipeline call;
(b) throughput with 1, 4 and 16 concurrent clients vs diffusers serving one request at a time;
(c) where the time goes per stage (from the server's /metrics): queue wait (sent -> batch start), compute, and
    the rest of the hop (IPC, batching window, orchestrator), and the CPU time per image of every process
    (frontend, each stage rank) for single requests and under each client count;
(d) overlap under load: for each serve throughput phase, the denoiser's busy share (its batch compute time over
    the phase's wall time; 1.0 when text encoding and VAE decoding of other requests run while it computes) and
    the stages' concurrency (every stage's compute time over the wall time; above 1 when stages overlap);
(e) the latency pairs split into the denoiser (diffusers' transformer forward calls, timed by hooks, against the
    serve denoiser's step compute from /metrics), the text encoder (diffusers' ``encode_prompt`` against the text
    encoder stage's compute) and the rest of each request.

Every measure alternates its phases (diffusers, serve, diffusers, serve, ...), with a pause of ``PAUSE_S``
before each, and reports the median of the per-pair ratios, so a noisy neighbour on the machine hits both sides
alike. Requests go through a keep-alive client per client thread (``tools/serve_process.py``).

Usage: ``python tools/bench_serving.py [--family flux|qwen-image] [--preset small] [--size 256x256] [--steps 8] [--repeats 9] [--rounds 3]
[--quick] [--cpu-linear torch] [--baseline compiled] [--compile]``. The recorded run (docs/BENCHMARKS.md) is the plain
command with its defaults; ``--cpu-linear torch`` gives the server torch's own linear kernel, diffusers' (the serving
overhead alone). ``--baseline compiled``: diffusers with ``pipe.transformer = torch.compile(pipe.transformer)`` (its
compile in the excluded warm-up call); ``--compile``: the server with ``[stages.denoiser] compile = true``, warmed up at
``--size`` before it is healthy (the start-to-healthy time is printed: the cold start).
``python tools/bench_serving.py arrivals --help``: Poisson arrivals, step-level vs request-level denoiser scheduling
(tools/bench_arrivals.py). ``python tools/bench_serving.py video --help``: /v1/videos of a Wan model against diffusers'
WanPipeline and sequence-parallel scaling (tools/bench_video.py).
Prints a table; ratios matter, absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import logging
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import ServeProcess, config_text, ensure_model  # noqa: E402

logger = logging.getLogger(__name__)


class _Diffusers:
    """The family's diffusers pipeline in this process: the baseline every serve phase is paired with."""

    def __init__(self, path: Path, body: dict, compiled: bool = False) -> None:
        import torch
        from diffusers import DiffusionPipeline

        self.torch = torch
        self.pipe = DiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)
        # the request's guidance_scale where the model has a guidance embedding (serve passes it the same way), and
        # the request's true_cfg_scale (1: no negative prompt) where the pipeline takes one
        self.guidance = {"guidance_scale": 3.5} if self.pipe.transformer.config.get("guidance_embeds") else {}
        if "true_cfg_scale" in inspect.signature(self.pipe.__call__).parameters:
            self.guidance["true_cfg_scale"] = 1.0
        self.pipe.set_progress_bar_config(disable=True)
        if compiled:  # --baseline compiled: the one line a diffusers user adds (timed by hooks around it)
            self.pipe.transformer = torch.compile(self.pipe.transformer)
        self.body = body
        self.w, self.h = (int(x) for x in body["size"].split("x"))
        self.transformer_s = 0.0  # time inside the transformer's forward calls, summed (table (e))
        self.encode_s = 0.0  # time inside encode_prompt, summed (table (e))
        started: list[float] = []
        encode = self.pipe.encode_prompt

        def timed_encode(*args: object, **kwargs: object) -> object:
            t0 = time.perf_counter()
            try:
                return encode(*args, **kwargs)
            finally:
                self.encode_s += time.perf_counter() - t0

        self.pipe.encode_prompt = timed_encode

        def before(*_: object) -> None:
            started.append(time.perf_counter())

        def after(*_: object) -> None:
            self.transformer_s += time.perf_counter() - started.pop()

        self.pipe.transformer.register_forward_pre_hook(before)
        self.pipe.transformer.register_forward_hook(after)

    def once(self, seed: int) -> float:
        t0 = time.perf_counter()
        self.pipe(self.body["prompt"], height=self.h, width=self.w,
                  num_inference_steps=self.body["num_inference_steps"], **self.guidance,
                  generator=self.torch.Generator("cpu").manual_seed(seed), output_type="np")
        return time.perf_counter() - t0

    def throughput(self, total: int) -> float:
        """diffusers serving ``total`` requests one at a time (a loop over the pipeline)."""
        t0 = time.perf_counter()
        for i in range(total):
            self.once(i)
        return total / (time.perf_counter() - t0)


class _Server(ServeProcess):
    def __init__(self, model: Path, max_batch: int, env: dict[str, str] | None = None, cpu_sharing: str = "",
                 cpu_linear: str = "", compile_size: str = "") -> None:
        def edit(text: str) -> str:  # [placement] cpu_sharing (runtime/cores.py), [stages.denoiser] cpu_linear
            if cpu_linear:  # (stages/cpu_linear.py); "": the config's
                text = text.replace("[stages.denoiser]\n", f'[stages.denoiser]\ncpu_linear = "{cpu_linear}"\n', 1)
            if compile_size:  # [stages.denoiser] compile (stages/compile.py), warmed up at the benchmark's size
                text = text.replace("[stages.denoiser]\n", f'[stages.denoiser]\ncompile = true\n'
                                    f'compile_warmup = ["{compile_size}"]\n', 1)
            return text + f'\n[placement]\ncpu_sharing = "{cpu_sharing}"\n' if cpu_sharing else text

        t0 = time.perf_counter()
        super().__init__(config_text(model, max_batch, edit), name="bench", env=env, post_timeout_s=600,
                         timeout_s=3600 if compile_size else 300)
        self.start_s = time.perf_counter() - t0  # to healthy: with compile, the warm-up's graphs included

    def metrics(self) -> dict[tuple[str, str], float]:
        out = {}
        text = self.metrics_text()
        for m in re.finditer(r'^(omni_stage_\w+_seconds)_(sum|count){stage="(\w+)"} (\S+)$', text, re.M):
            out[(f"{m.group(1)}_{m.group(2)}", m.group(3))] = float(m.group(4))
        # the step-level denoiser's busy time: its steps' compute (a finished item's compute_s is its residence)
        for m in re.finditer(r'^omni_denoiser_step_seconds_sum{replica="\d+"} (\S+)$', text, re.M):
            key = ("omni_denoiser_step_seconds_sum", "denoiser")
            out[key] = out.get(key, 0.0) + float(m.group(1))
        return out



STAGES = ("text_encoder", "denoiser", "vae")
PAUSE_S = 0.1
"""Quiet time before every timed phase: libgomp's threads spin ~10 ms after a process's last parallel region
(diffusers' in this process, the stages' in theirs), which would otherwise land on the other side's first ms."""


def _delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a.get(k, 0.0) for k in b}


def _throughput(server: _Server, body: dict, clients: int, total: int, load: dict | None = None) -> float:
    """Images per second of ``total`` requests from ``clients`` concurrent clients. ``load`` (if given) gets the
    phase's wall time, the change of the server's metrics and of every process's CPU time."""
    def one(i: int) -> float:
        return server.post({**body, "seed": i})

    m0, c0 = (server.metrics(), server.cpu()) if load is not None else ({}, {})
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        list(ex.map(one, range(total)))
    wall = time.perf_counter() - t0
    if load is not None:
        load.update(wall=wall, images=total, metrics=_delta(m0, server.metrics()), cpu=_delta(c0, server.cpu()))
    return total / wall


def _overlap(load: dict) -> tuple[float, float]:
    """(denoiser busy share, stage concurrency) of one throughput phase: batch compute time over wall time."""
    comp = {s: load["metrics"].get(("omni_stage_compute_seconds_sum", s), 0.0) for s in STAGES}
    steps = load["metrics"].get(("omni_denoiser_step_seconds_sum", "denoiser"), 0.0)
    if steps > 0:  # step-level scheduling: the denoiser is busy while its steps run
        comp["denoiser"] = steps
    return comp["denoiser"] / load["wall"], sum(comp.values()) / load["wall"]


def _process_order(name: str) -> tuple[int, str]:
    """frontend first, then the stage ranks in pipeline order."""
    if name == "frontend":
        return 0, name
    return 1 + next((i for i, s in enumerate(STAGES) if name.startswith(s)), len(STAGES)), name


def _requests(clients: int, quick: bool) -> int:
    """Requests per throughput phase: 4 per client up to 4 clients, 2 per client at 16 (32: every client twice)."""
    return clients * (2 if quick or clients > 4 else 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--family", default="flux", choices=["flux", "qwen-image"],
                   help="the embedded model <preset>-<family> and, as the baseline, its diffusers pipeline")
    p.add_argument("--size", default="256x256")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9, help="alternating (diffusers, serve) latency pairs")
    p.add_argument("--rounds", type=int, default=3, help="alternating throughput pairs per client count")
    p.add_argument("--quick", action="store_true", help="3 latency pairs, 1 throughput round, fewer requests")
    p.add_argument("--max-batch", type=int, default=0,
                   help="every stage's max_batch_size (0: the default config's, 4 for the denoiser, 8 for the others)")
    p.add_argument("--server-env", action="append", default=[], metavar="K=V",
                   help="environment of the server only (its stage ranks too), e.g. GOMP_SPINCOUNT=300000 for "
                        "libgomp's default spinning instead of the ranks' settings (runtime/cores.py)")
    p.add_argument("--cpu-sharing", default="", choices=["", "auto", "exclusive", "concurrent"],
                   help="the server's [placement] cpu_sharing (default: the config's, auto)")
    p.add_argument("--cpu-linear", default="", choices=["", "onednn", "torch"],
                   help="the server's [stages.denoiser] cpu_linear (default: the config's, onednn); 'torch' runs "
                        "the same linear kernel as diffusers, to see the serving overhead alone")
    p.add_argument("--baseline", default="eager", choices=["eager", "compiled"],
                   help="diffusers as loaded, or with pipe.transformer = torch.compile(pipe.transformer) (its "
                        "compile in the excluded warm-up call)")
    p.add_argument("--clients", default="1,4,16", help="the throughput phases' client counts, comma-separated")
    p.add_argument("--compile", action="store_true",
                   help="the server's [stages.denoiser] compile = true, warmed up at --size before it is healthy")
    args = p.parse_args(argv)
    bad = [kv for kv in args.server_env if "=" not in kv]
    if bad:
        p.error(f"--server-env {bad[0]!r}: expected K=V")
    logging.basicConfig(level=logging.WARNING)
    repeats, rounds = (3, 1) if args.quick else (args.repeats, args.rounds)
    body = {"prompt": "a photo of a red fox in the snow", "size": args.size, "num_inference_steps": args.steps,
            "seed": 0}
    model = ensure_model(args.preset, args.family)
    base = _Diffusers(model, body, compiled=args.baseline == "compiled")
    server = _Server(model, max_batch=args.max_batch, env=dict(kv.split("=", 1) for kv in args.server_env),
                     cpu_sharing=args.cpu_sharing, cpu_linear=args.cpu_linear,
                     compile_size=args.size if args.compile else "")
    try:
        t0 = time.perf_counter()
        base.once(0)  # warm-up both (excluded; with --baseline compiled diffusers' compile)
        base_cold = time.perf_counter() - t0
        server.post(body)
        print(f"partial: diffusers {args.baseline} first call {base_cold:.1f} s, serve start to healthy "
              f"{server.start_s:.1f} s", flush=True)
        m0, c0 = server.metrics(), server.cpu()
        # Phases alternate (diffusers, serve, diffusers, serve, ...) so that a noisy neighbour hits both alike;
        # each pair gives one ratio and the table reports the median of the per-pair ratios.
        base_lats, lats, split = [], [], []
        dn_key, te_key = ("omni_denoiser_step_seconds_sum", "denoiser"), ("omni_stage_compute_seconds_sum", "text_encoder")
        for i in range(repeats):
            time.sleep(PAUSE_S)
            t0, e0 = base.transformer_s, base.encode_s
            base_lats.append(base.once(i))
            dn_base, te_base = base.transformer_s - t0, base.encode_s - e0
            ma = server.metrics()
            time.sleep(PAUSE_S)
            lats.append(server.post({**body, "seed": i}))
            mb = server.metrics()
            dn_serve, te_serve = mb.get(dn_key, 0.0) - ma.get(dn_key, 0.0), mb.get(te_key, 0.0) - ma.get(te_key, 0.0)
            split.append((dn_base, dn_serve, te_base, te_serve, base_lats[-1] - dn_base - te_base,
                          lats[-1] - dn_serve - te_serve))
        m1, cpu_single = server.metrics(), _delta(c0, server.cpu())
        ratios = [s / b for s, b in zip(lats, base_lats, strict=True)]
        rows = [("(a) latency, 1 request", f"{statistics.median(base_lats) * 1000:.0f} ms",
                 f"{statistics.median(lats) * 1000:.0f} ms", f"{statistics.median(ratios):.3f}x time",
                 " ".join(f"{r:.3f}" for r in ratios))]
        print("partial:", rows[-1], flush=True)  # each row as it is measured: a long run killed keeps its rows
        loads: dict[int, list[dict]] = {}
        for clients in (int(c) for c in args.clients.split(",")):
            total = _requests(clients, args.quick)
            pairs = []
            for _ in range(rounds):
                time.sleep(PAUSE_S)
                b = base.throughput(total)
                time.sleep(PAUSE_S)
                load: dict = {}
                t = _throughput(server, body, clients, total, load)
                pairs.append((b, t))
                loads.setdefault(clients, []).append(load)
            tr = [t / b for b, t in pairs]
            rows.append((f"(b) throughput, {clients} clients", f"{statistics.median(b for b, _ in pairs):.2f} img/s",
                         f"{statistics.median(t for _, t in pairs):.2f} img/s", f"{statistics.median(tr):.3f}x",
                         " ".join(f"{r:.3f}" for r in tr)))
            print("partial:", rows[-1], flush=True)
        print(f"\nbench_serving: {args.preset}-{args.family} ({type(base.pipe).__name__}), {args.size}, {args.steps} steps, {os.cpu_count()} CPUs, "
              f"{repeats} latency pairs, {rounds} throughput round(s), phases alternating")
        print(f"baseline: diffusers {args.baseline} (first call {base_cold:.1f} s); serve: compile = "
              f"{str(args.compile).lower()}, cpu_linear = {args.cpu_linear or 'onednn'} (start to healthy "
              f"{server.start_s:.1f} s)")
        print(f"{'measure':32} {'diffusers':>14} {'omni serve':>14} {'median ratio':>14}  per-pair ratios")
        for r in rows:
            print(f"{r[0]:32} {r[1]:>14} {r[2]:>14} {r[3]:>14}  {r[4]}")
        print("\n(c) per stage, single requests (mean per hop)")
        print(f"{'stage':14} {'queue wait':>12} {'compute':>12} {'other (IPC, window, routing)':>30}")
        for stage in STAGES:
            def mean(name: str, stage: str = stage) -> float:
                n = m1[(f"{name}_count", stage)] - m0.get((f"{name}_count", stage), 0)
                return (m1[(f"{name}_sum", stage)] - m0.get((f"{name}_sum", stage), 0)) / max(n, 1)

            q, c = mean("omni_stage_queue_wait_seconds"), mean("omni_stage_compute_seconds")
            hop = mean("omni_stage_latency_seconds")
            print(f"{stage:14} {q * 1000:>10.1f}ms {c * 1000:>10.1f}ms {(hop - q - c) * 1000:>28.1f}ms")
        names = sorted(cpu_single, key=_process_order)
        print("\n(c) CPU time per image, by process (ms; user + system, every thread)")
        print(f"{'phase':22} " + " ".join(f"{n:>17}" for n in names))
        print(f"{'single requests':22} " + " ".join(f"{cpu_single[n] / repeats * 1000:>17.0f}" for n in names))
        for clients, ls in loads.items():
            imgs = sum(x["images"] for x in ls)
            print(f"{f'{clients} clients':22} " + " ".join(
                f"{sum(x['cpu'].get(n, 0.0) for x in ls) / imgs * 1000:>17.0f}" for n in names))
        print("\n(d) overlap under load (serve phases): denoiser busy share | stage concurrency (compute / wall)")
        for clients, ls in loads.items():
            ov = [_overlap(x) for x in ls]
            print(f"{clients:>3} clients: " + "  ".join(f"{d:.3f} | {c:.3f}" for d, c in ov))
        if all(x[1] > 0 for x in split):  # step-level scheduling: the step metric is the denoiser's compute
            print("\n(e) the latency pairs split: the denoiser (diffusers' transformer calls | the serve denoiser's "
                  "steps), the text encoder (encode_prompt | the stage's compute) and the rest (VAE, and for serve: "
                  "HTTP, hops, PNG)")
            print(f"{'':22} {'diffusers':>12} {'omni serve':>12} {'median ratio':>14}  per-pair ratios")
            for name, b, sv in (("denoiser", 0, 1), ("text encoder", 2, 3), ("rest", 4, 5)):
                r = [x[sv] / x[b] for x in split]
                print(f"{name:22} {statistics.median(x[b] for x in split) * 1000:>10.0f}ms "
                      f"{statistics.median(x[sv] for x in split) * 1000:>10.0f}ms {statistics.median(r):>13.3f}x  "
                      + " ".join(f"{x:.3f}" for x in r))
    finally:
        server.stop()
    return 0


def arrivals_main(argv: list[str]) -> int:
    """``bench_serving.py arrivals ...``: the arrival-process benchmark (tools/bench_arrivals.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_arrivals import main as arrivals

    return arrivals(argv)


def video_main(argv: list[str]) -> int:
    """``bench_serving.py video ...``: /v1/videos against WanPipeline, SP scaling (tools/bench_video.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_video import main as video

    return video(argv)


if __name__ == "__main__":
    sys.exit(arrivals_main(sys.argv[2:]) if sys.argv[1:2] == ["arrivals"]
             else video_main(sys.argv[2:]) if sys.argv[1:2] == ["video"] else main())
