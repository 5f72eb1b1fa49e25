"""Profile one denoiser batch inside a stage-like process against the same call in-process (issue 16).

Phases, run in rounds, alternating (each round runs every phase once, in a rotated order), one denoiser batch each
(same embeddings, seeds, size and steps):

- ``diffusers``: diffusers' ``FluxPipeline`` denoising loop in this process (``prompt_embeds`` given,
  ``output_type="latent"``: no text encoder, no VAE), the baseline of ``tools/bench_serving.py``;
- ``inproc``: our ``DenoiserEngine.step`` in this process (its linears on oneDNN, ``stages/cpu_linear.py``);
  ``inproc:torch``: the same with ``cpu_linear = "torch"`` (torch's own linear kernel, the one diffusers runs);
- ``stage``: the same call in a child started exactly as the launcher starts a rank (its ``forkserver`` context
  with torch preloaded, the placement's environment, the parent watchdog, ``torch.set_num_threads`` of
  ``cores.stage_threads``); its inputs arrive through ``runtime.tensor_handoff`` (the shm copy), and a stop
  hook runs before every step as the driver's does; ``stage-glibc-defaults``: the same without the rank's
  allocator settings (``runtime.allocator``), to see their share;
- ``spawn:K=V,K=V``: the same in a freshly spawned interpreter whose environment has ``K=V`` from its start, so
  variables read when torch and libgomp load (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ``MALLOC_*``) take effect
  (in a forkserver child they come too late: libgomp read its environment when the forkserver imported torch).

Measures per phase: wall time, CPU time of the computing process (every thread: user + system), and with
``--torch-profile`` the top ops by self CPU time and the share of the wall time spent outside ops (Python and
dispatch between the ops: the per-step overhead). ``--neighbours idle|busy`` adds two processes standing in for the
text encoder and the VAE: idle (torch loaded, thread pools warmed, then asleep) or busy (matmuls in a loop on
``--neighbour-threads`` threads, as when they encode/decode other requests while the denoiser runs).
``--flush-denormal`` sets ``torch.set_flush_denormal(True)`` in every phase. ``--shm`` also times the shm hop
(publish, fetch, stack) of the denoiser's inputs alone.

Usage: ``python tools/profile_denoiser.py [--preset small] [--size 256x256] [--steps 8] [--batch 1] [--rounds 5]
[--phases diffusers,inproc,stage] [--neighbours none|idle|busy] [--torch-profile]``. Prints a table with the
median of the per-round ratios against the first phase; absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a red fox in the snow"


def _usage() -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of this process so far, every thread."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _top_ops(prof: Any, wall_s: float, n: int = 10) -> dict:
    """Top ops by self CPU time and the share of ``wall_s`` spent outside any op (on the calling thread); ops are
    aten's and oneDNN's (``mkldnn::``, the linears of ``stages/cpu_linear.py``)."""
    rows = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::"))]
    self_us = sum(e.self_cpu_time_total for e in rows)
    top = sorted(rows, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return {"in_ops_s": self_us / 1e6, "outside_ops_share": max(0.0, 1 - self_us / 1e6 / wall_s),
            "top": [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in top]}


def _timed(fn: Any, profile: bool) -> dict:
    u0, s0, f0 = _usage()
    t0 = time.perf_counter()
    prof = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    else:
        fn()
    wall = time.perf_counter() - t0
    u1, s1, f1 = _usage()
    out = {"wall": wall, "cpu": u1 - u0 + s1 - s0, "sys": s1 - s0, "faults": f1 - f0}
    if prof is not None:
        out["prof"] = _top_ops(prof, wall)
    return out


class Job:
    """What to compute: embeddings (made once, in the parent, by our text encoder) and the request numbers."""

    def __init__(self, model: Path, size: str, steps: int, batch: int) -> None:
        from omni_runtime.stages.text_encoder import TextEncoderStage

        self.model, self.steps, self.batch = model, steps, batch
        self.w, self.h = (int(x) for x in size.split("x"))
        enc = TextEncoderStage.from_pretrained(model).encode([PROMPT])
        self.embeds = enc["prompt_embeds"][0].contiguous()
        self.pooled = enc["pooled_prompt_embeds"][0].contiguous()

    def spec(self) -> dict:
        return {"model": str(self.model), "w": self.w, "h": self.h, "steps": self.steps, "batch": self.batch,
                "embeds": [list(self.embeds.shape), self.embeds.numpy().tobytes().hex()],
                "pooled": [list(self.pooled.shape), self.pooled.numpy().tobytes().hex()]}


def _tensor(pair: list) -> torch.Tensor:
    shape, data = pair
    return torch.from_numpy(np.frombuffer(bytes.fromhex(data), dtype=np.float32).reshape(shape).copy())


def _items(spec: dict, inputs: list[dict]) -> list:
    from omni_runtime.runtime.requests import parse_request
    from omni_runtime.stages.engine import StageItem

    params = parse_request({"prompt": PROMPT, "size": f"{spec['w']}x{spec['h']}",
                            "num_inference_steps": spec["steps"], "guidance_scale": 3.5})
    return [StageItem(params=params, seed=i, inputs=inputs[i]) for i in range(spec["batch"])]


def _stop_hook(step: int) -> list[int]:
    return []  # what the driver's hook returns when nothing left; the real one also polls its socket


# ------------------------------------------------------------------------------------------------ children


def _child_loop(conn: Any, spec_json: str, via_shm: bool) -> None:
    """A denoiser rank stand-in: load the engine, then run the batch on every "run" command."""
    from omni_runtime.runtime import tensor_handoff
    from omni_runtime.stages.engine import load_engine

    spec = json.loads(spec_json)
    if spec.get("flush_denormal"):
        torch.set_flush_denormal(True)
    engine = load_engine("denoiser", spec["model"], "float32", "cpu")
    embeds, pooled = _tensor(spec["embeds"]), _tensor(spec["pooled"])
    conn.send_bytes(json.dumps({"ready": True, "threads": torch.get_num_threads(),
                                "omp": os.environ.get("OMP_WAIT_POLICY", "")}).encode())
    pub = tensor_handoff.Publisher(pooled=True)  # as the text encoder publishes to a one-rank denoiser
    while True:
        cmd = json.loads(conn.recv_bytes())
        if cmd["cmd"] == "stop":
            break
        refs = []
        if via_shm:  # the hop the stage's inputs take: published by the producer, fetched (views) by the driver
            refs = [pub.publish({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})
                    for _ in range(spec["batch"])]
            inputs = [tensor_handoff.fetch(r) for r in refs]
        else:
            inputs = [{"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}] * spec["batch"]
        items = _items(spec, inputs)
        res = _timed(lambda items=items: engine.step(items, stop=_stop_hook), cmd["profile"])
        for r in refs:
            tensor_handoff.release(r)
        conn.send_bytes(json.dumps(res).encode())
    pub.close()
    tensor_handoff.shutdown()


def _stage_main(conn: Any, spec_json: str, env: dict[str, str], parent_pid: int) -> None:
    """As ``runtime.launcher._rank_main`` + ``runtime.stage_worker.worker_main`` set a rank up."""
    from omni_runtime.comm import cleanup
    from omni_runtime.runtime import allocator
    from omni_runtime.runtime.cores import cpus, stage_threads

    os.environ.update(env)
    cleanup.exit_with_parent(parent_pid)
    if not os.environ.get("PROFILE_GLIBC_DEFAULTS"):  # as _rank_main does; set it to see the allocator's share
        allocator.keep_freed_memory()
    torch.set_num_threads(stage_threads(1, cpus(), json.loads(spec_json).get("threads", 0)))
    _child_loop(conn, spec_json, via_shm=True)


def _spawn_main(conn: Any, spec_json: str, parent_pid: int) -> None:
    from omni_runtime.comm import cleanup
    from omni_runtime.runtime import allocator
    from omni_runtime.runtime.cores import cpus, stage_threads

    cleanup.exit_with_parent(parent_pid)
    allocator.keep_freed_memory()
    torch.set_num_threads(stage_threads(1, cpus(), json.loads(spec_json).get("threads", 0)))
    _child_loop(conn, spec_json, via_shm=True)


def _neighbour_main(mode: str, threads: int, parent_pid: int) -> None:
    """A text encoder / VAE stand-in: idle (pools warmed, asleep) or busy (matmuls in a loop)."""
    from omni_runtime.comm import cleanup

    cleanup.exit_with_parent(parent_pid)
    torch.set_num_threads(threads)
    a = torch.randn(256, 256)
    for _ in range(20):
        a = torch.tanh(a @ a)
    while True:
        if mode == "busy":
            for _ in range(50):
                a = torch.tanh(a @ a)
        else:
            time.sleep(1)


class _Child:
    def __init__(self, name: str, ctx: Any, target: Any, args: tuple, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.conn, child = mp.Pipe()
        saved = dict(os.environ)
        if env:  # a spawned interpreter takes os.environ as it is at start()
            os.environ.update(env)
        try:
            self.proc = ctx.Process(target=target, args=(child, *args), daemon=True, name=f"profile-{name}")
            self.proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        if not self.conn.poll(600):
            raise RuntimeError(f"{name}: the child did not get ready")
        self.info = json.loads(self.conn.recv_bytes())

    def run(self, profile: bool) -> dict:
        self.conn.send_bytes(json.dumps({"cmd": "run", "profile": profile}).encode())
        return json.loads(self.conn.recv_bytes())

    def close(self) -> None:
        try:
            self.conn.send_bytes(json.dumps({"cmd": "stop"}).encode())
        except OSError:
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


# ------------------------------------------------------------------------------------------------ in-process


class _Diffusers:
    def __init__(self, job: Job) -> None:
        from diffusers import FluxPipeline

        self.job = job
        self.pipe = FluxPipeline.from_pretrained(str(job.model), torch_dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)

    def run(self, profile: bool) -> dict:
        j = self.job

        def call() -> None:
            self.pipe(prompt_embeds=j.embeds[None].expand(j.batch, -1, -1),
                      pooled_prompt_embeds=j.pooled[None].expand(j.batch, -1), height=j.h, width=j.w,
                      num_inference_steps=j.steps, guidance_scale=3.5,
                      generator=[torch.Generator("cpu").manual_seed(i) for i in range(j.batch)],
                      output_type="latent")
        return _timed(call, profile)


class _InProc:
    def __init__(self, job: Job, cpu_linear: str = "onednn") -> None:
        from omni_runtime.stages.engine import load_engine

        self.engine = load_engine("denoiser", job.model, "float32", "cpu", cpu_linear=cpu_linear)
        spec = job.spec()
        inputs = [{"prompt_embeds": job.embeds, "pooled_prompt_embeds": job.pooled}] * job.batch
        self.items = _items(spec, inputs)

    def run(self, profile: bool) -> dict:
        return _timed(lambda: self.engine.step(self.items, stop=_stop_hook), profile)


def _shm_hop(job: Job, n: int = 50) -> float:
    """Seconds per publish + fetch + stack + release of one item's denoiser inputs."""
    from omni_runtime.runtime import tensor_handoff

    pub = tensor_handoff.Publisher(pooled=True)
    t0 = time.perf_counter()
    for _ in range(n):
        ref = pub.publish({"prompt_embeds": job.embeds, "pooled_prompt_embeds": job.pooled})
        got = tensor_handoff.fetch(ref)
        torch.stack([got["prompt_embeds"]]), torch.stack([got["pooled_prompt_embeds"]])
        tensor_handoff.release(ref)
    dt = (time.perf_counter() - t0) / n
    pub.close()
    return dt


def _phase(name: str, job: Job, args: argparse.Namespace) -> Any:
    spec = job.spec()
    spec.update(flush_denormal=args.flush_denormal, threads=args.threads)
    spec_json = json.dumps(spec)
    if name == "diffusers":
        return _Diffusers(job)
    if name in ("inproc", "inproc:torch"):
        return _InProc(job, name.partition(":")[2] or "onednn")
    if name in ("stage", "stage-glibc-defaults"):
        from omni_runtime.runtime.launcher import _CTX

        env = {"GLOO_SOCKET_IFNAME": "lo"}
        if name == "stage-glibc-defaults":
            env["PROFILE_GLIBC_DEFAULTS"] = "1"
        return _Child(name, _CTX, _stage_main, (spec_json, env, os.getpid()))
    if name.startswith("spawn"):
        env = dict(kv.split("=", 1) for kv in name.partition(":")[2].split(",") if kv)
        return _Child(name, mp.get_context("spawn"), _spawn_main, (spec_json, os.getpid()), env=env)
    raise SystemExit(f"--phases: unknown phase {name!r}; allowed: diffusers, inproc, inproc:torch, stage, "
                     f"stage-glibc-defaults, spawn:K=V,...")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--size", default="256x256")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--phases", default="diffusers,inproc,stage",
                   help="comma list; a spawn phase's own commas go after ':' and between K=V pairs, so separate "
                        "phases with ';' when one is a spawn phase with several variables")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of every phase (0: this process's default, the launcher's in the children)")
    p.add_argument("--neighbours", default="none", choices=["none", "idle", "busy"])
    p.add_argument("--neighbour-threads", type=int, default=0, help="0: every core (the launcher's default)")
    p.add_argument("--flush-denormal", action="store_true")
    p.add_argument("--torch-profile", action="store_true", help="torch.profiler on the last round")
    p.add_argument("--shm", action="store_true", help="also time the shm hop of the inputs alone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from omni_runtime.runtime.model_store import ensure_model

    if args.flush_denormal:
        torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in (args.phases.split(";") if ";" in args.phases else args.phases.split(",")) if n]
    model = ensure_model(str(ROOT / "models" / f"{args.preset}-flux"))
    job = Job(model, args.size, args.steps, args.batch)
    neighbours: list[mp.process.BaseProcess] = []
    if args.neighbours != "none":
        from omni_runtime.runtime.cores import cpus
        from omni_runtime.runtime.launcher import _CTX

        nt = args.neighbour_threads or cpus()
        for i in range(2):
            q = _CTX.Process(target=_neighbour_main, args=(args.neighbours, nt, os.getpid()), daemon=True,
                             name=f"profile-neighbour{i}")
            q.start()
            neighbours.append(q)
    phases = {n: _phase(n, job, args) for n in names}
    try:
        for ph in phases.values():  # warm-up
            ph.run(False)
        res: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                res[n].append(phases[n].run(args.torch_profile and r == args.rounds - 1))
        base = names[0]
        print(f"\nprofile_denoiser: preset {args.preset}, {args.size}, {args.steps} steps, batch {args.batch}, "
              f"{os.cpu_count()} CPUs, {args.rounds} rounds alternating, neighbours {args.neighbours}"
              f"{', flush denormal' if args.flush_denormal else ''}; ratios: median of per-round ratios to {base}")
        print(f"{'phase':32} {'wall':>9} {'CPU':>9} {'sys':>7} {'faults':>8} {'CPU/wall':>9} {'wall ratio':>11} "
              f"{'CPU ratio':>10}  per-round CPU ratios")
        for n in names:
            w = [x["wall"] for x in res[n]]
            c = [x["cpu"] for x in res[n]]
            wr = [a["wall"] / b["wall"] for a, b in zip(res[n], res[base], strict=True)]
            cr = [a["cpu"] / b["cpu"] for a, b in zip(res[n], res[base], strict=True)]
            sy = statistics.median(x["sys"] for x in res[n])
            fl = statistics.median(x["faults"] for x in res[n])
            print(f"{n:32} {statistics.median(w) * 1000:>7.0f}ms {statistics.median(c) * 1000:>7.0f}ms "
                  f"{sy * 1000:>5.0f}ms {fl:>8.0f} {statistics.median(c) / statistics.median(w):>9.2f} "
                  f"{statistics.median(wr):>10.3f}x {statistics.median(cr):>9.3f}x  {' '.join(f'{x:.3f}' for x in cr)}")
        for n, ph in phases.items():
            if isinstance(ph, _Child):
                print(f"  {n}: child threads {ph.info['threads']}, OMP_WAIT_POLICY={ph.info['omp'] or '-'}")
        if args.torch_profile:
            for n in names:
                prof = res[n][-1].get("prof")
                if not prof:
                    continue
                print(f"\n{n}: {prof['in_ops_s'] * 1000:.0f} ms in ops on the calling thread, "
                      f"{prof['outside_ops_share'] * 100:.1f}% of the wall time outside them (Python, dispatch)")
                for key, s, count in prof["top"]:
                    print(f"  {key:44} {s * 1000:>8.1f} ms  x{count}")
        if args.shm:
            print(f"\nshm hop of one item's inputs (publish + fetch + stack + release): {_shm_hop(job) * 1e6:.0f} us")
    finally:
        for ph in phases.values():
            if isinstance(ph, _Child):
                ph.close()
        for q in neighbours:
            q.kill()
            q.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
