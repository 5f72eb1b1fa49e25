"""One script that checks, on a machine with CUDA, everything a GPU changes (issue 28); one line per check, then a
summary. Nothing of it has run on a GPU yet: no machine of this project had one.

    python tools/gpu_check.py                 # CUDA; on a machine without CUDA: one line, exit 0
    python tools/gpu_check.py --device cpu    # the same checks on CPU and gloo (checks the script itself)

Checks (the reference of each in brackets; images are uint8, max |delta| <= 2/255 unless said):

* ``served fp32``, ``served bf16``: ``configs/default.toml`` (the embedded tiny Flux model) served with
  ``model.device = "cuda"`` and that dtype, one request with true CFG [diffusers' ``DiffusionPipeline`` of the same
  directory, same dtype, on the same GPU, same seed: the CPU generator both use];
* ``flash-attn``: the ``flash_attn`` backend's output and log-sum-exp [the ``math`` backend in float32; SDPA for
  the output, which it cannot give the LSE of], and with a key mask (which flash_attn does not take) the backend
  the selection then picks [``math``] (skipped without the ``flash_attn`` package);
* ``nccl world-1``: a one-rank mesh on ``cuda:0``: the default group is ``cpu:gloo,cuda:nccl`` and takes a CUDA and
  a CPU tensor, a one-rank NCCL group, the message queue set-up over the default group;
* with two GPUs, ``nccl mesh + fan-out``: two ranks build a ulysses-2 mesh on NCCL, exchange metadata (objects,
  tensor dicts, the SP length exchange through Ulysses attention) and CUDA tensors, and the rank fan-out sends a
  batch; then ``served ulysses 2``, ``served cfg 2``, ``served hsdp_shard 2`` [the default layout's served image];
  with one GPU these say why they are skipped.

The whole run stops starting checks after ``--budget-s`` (600 s) and says which it skipped. Exit 1 if one failed.
"""

from __future__ import annotations

import argparse
import base64
import io
import multiprocessing as mp
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import ServeProcess, config_text, ensure_model  # noqa: E402

TOLERANCE = 2  # uint8 levels
BODY = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "true_cfg_scale": 2.0, "seed": 7,
        "size": "128x128", "num_inference_steps": 4, "response_format": "b64_json"}


class Skip(Exception):
    """A check that cannot run on this machine (the message says why)."""


class Run:
    """What the checks share: the device, the model, the served default image they compare layouts with."""

    def __init__(self, device: str, model: Path, gpus: int) -> None:
        self.device, self.model, self.gpus = device, model, gpus
        self.default_image: np.ndarray | None = None


# ---------------------------------------------------------------------- served images
def _layout_config(run: Run, dtype: str, **parallel: int) -> str:
    def edit(text: str) -> str:
        text = text.replace('device = "cpu"', f'device = "{run.device}"')
        text = text.replace('dtype = "float32"', f'dtype = "{dtype}"')
        for key, value in parallel.items():
            text, n = re.subn(rf"^{key} = 1$", f"{key} = {value}", text, count=1, flags=re.M)
            if n != 1:
                raise RuntimeError(f"configs/default.toml has no '{key} = 1' line to edit")
        return text

    return config_text(run.model, edit=edit)


def _served_image(run: Run, dtype: str, **parallel: int) -> np.ndarray:
    from PIL import Image

    server = ServeProcess(_layout_config(run, dtype, **parallel), name="gpu-check", timeout_s=240, post_timeout_s=240)
    try:
        r = server.client().post("/v1/images/generations", json=BODY)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
    finally:
        server.stop()


def _diffusers_image(run: Run, dtype: torch.dtype) -> np.ndarray:
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipe = DiffusionPipeline.from_pretrained(run.model, dtype=dtype).to(run.device)
    pipe.set_progress_bar_config(disable=True)
    w, h = (int(x) for x in BODY["size"].split("x"))
    out = pipe(prompt=BODY["prompt"], negative_prompt=BODY["negative_prompt"], true_cfg_scale=BODY["true_cfg_scale"],
               height=h, width=w, num_inference_steps=BODY["num_inference_steps"], max_sequence_length=512,
               generator=torch.Generator("cpu").manual_seed(BODY["seed"]), output_type="np").images[0]
    del pipe
    if run.device == "cuda":
        torch.cuda.empty_cache()
    return (out * 255).round().astype(np.uint8)


def _compare(got: np.ndarray, want: np.ndarray, against: str) -> str:
    if got.shape != want.shape:
        raise AssertionError(f"image shape {got.shape}, {against} {want.shape}")
    delta = np.abs(got.astype(np.int16) - want.astype(np.int16))
    text = f"max |delta| {int(delta.max())}/255, mean {float(delta.mean()):.3f} against {against}"
    if delta.max() > TOLERANCE:
        raise AssertionError(text + f" (allowed {TOLERANCE}/255)")
    return text


def check_served_fp32(run: Run) -> str:
    got = _served_image(run, "float32")
    run.default_image = got
    return _compare(got, _diffusers_image(run, torch.float32), f"diffusers fp32 on {run.device}")


def check_served_bf16(run: Run) -> str:
    return _compare(_served_image(run, "bfloat16"), _diffusers_image(run, torch.bfloat16),
                    f"diffusers bf16 on {run.device}")


def _served_layout(**parallel: int) -> Callable[[Run], str]:
    def check(run: Run) -> str:
        if run.gpus < 2:
            raise Skip(f"needs two GPUs, this machine has {run.gpus}")
        if run.default_image is None:
            raise Skip("the default layout's image is missing (served fp32 did not pass)")
        return _compare(_served_image(run, "float32", **parallel), run.default_image, "the default layout served")

    return check


# ---------------------------------------------------------------------- attention
def check_flash_attn(run: Run) -> str:
    from omni_runtime.parallel.attention.backends import attention_block, flash_attn_available, select_backend

    if run.device != "cuda" or not flash_attn_available():
        raise Skip("the flash_attn package is not importable" if run.device == "cuda" else "CUDA only")
    g = torch.Generator("cpu").manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    out, lse = attention_block(q, k, v, return_lse=True, backend="flash_attn")
    ref, ref_lse = attention_block(q.float(), k.float(), v.float(), return_lse=True, backend="math")
    err, lse_err = (out.float() - ref).abs().max().item(), (lse.float() - ref_lse).abs().max().item()
    sdpa_err = (out.float() - attention_block(q, k, v, backend="sdpa").float()).abs().max().item()
    if max(err, lse_err, sdpa_err) > 2e-2:
        raise AssertionError(f"flash_attn vs math: out {err:.3g}, lse {lse_err:.3g}; vs sdpa: out {sdpa_err:.3g} "
                             "(allowed 2e-2)")
    mask = torch.ones(2, 300, dtype=torch.bool, device="cuda")
    mask[:, 250:] = False
    picked = select_backend(q, need_lse=True, has_mask=True).name
    masked, masked_lse = attention_block(q, k, v, key_mask=mask, return_lse=True)
    want, want_lse = attention_block(q.float(), k.float(), v.float(), key_mask=mask, return_lse=True, backend="math")
    merr = max((masked.float() - want).abs().max().item(), (masked_lse.float() - want_lse).abs().max().item())
    if merr > 2e-2:
        raise AssertionError(f"masked attention ({picked}) vs math: {merr:.3g} (allowed 2e-2)")
    return (f"out {err:.2g}, lse {lse_err:.2g} vs math fp32, out {sdpa_err:.2g} vs sdpa; with a key mask {picked} "
            f"is picked, {merr:.2g}")


# ---------------------------------------------------------------------- collectives
def check_world1(run: Run) -> str:
    import torch.distributed as dist

    from omni_runtime.comm.shm_broadcast import MessageQueue
    from omni_runtime.parallel.group_coordinator import GroupCoordinator
    from omni_runtime.parallel.mesh import Mesh, backend_for
    from omni_runtime.parallel.parallel_spec import ParallelSpec

    dev = torch.device(f"{run.device}:0" if run.device == "cuda" else "cpu")
    mesh = Mesh.build(ParallelSpec(), 0, None, dev)
    try:
        config = str(dist.get_backend_config())
        on_device, on_cpu = torch.ones(3, device=dev), torch.ones(3)
        dist.all_reduce(on_device)
        dist.all_reduce(on_cpu)
        solo = GroupCoordinator([[0]], 0, backend_for(dev), group_name="solo")
        with MessageQueue.create_from_process_group(None) as mq:
            readers = mq.n_reader
        solo.barrier()
        solo.destroy()
    finally:
        mesh.destroy()
    return f"default group {config}: a {dev.type} and a cpu all_reduce, a one-rank group, a queue of {readers} readers"


def _two_rank_worker(rank: int, device_type: str, store: str, out_dir: str) -> None:
    try:
        _two_rank_body(rank, device_type, store, out_dir)
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _two_rank_body(rank: int, device_type: str, store: str, out_dir: str) -> None:
    from omni_runtime.parallel.attention.sp_attention import SPMesh, sp_attention
    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec
    from omni_runtime.runtime.messages import Batch, Stop
    from omni_runtime.runtime.rank_fanout import RankFanout

    dev = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    mesh = Mesh.build(ParallelSpec(ulysses=2), rank, f"file://{store}", dev, timeout_s=120)
    fanout = RankFanout(rank, 2, mesh)
    try:
        g = mesh.group("ulysses")
        assert g.broadcast_object({"step": 1} if rank == 0 else None) == {"step": 1}
        d = g.broadcast_tensor_dict({"x": torch.arange(4.0, device=dev), "c": torch.ones(2), "n": 3}
                                    if rank == 0 else None)
        assert d["x"].device == dev and d["x"].tolist() == [0, 1, 2, 3] and d["n"] == 3
        gathered = g.all_gather(torch.full((2,), float(rank), device=dev), dim=0)
        assert gathered.tolist() == [0, 0, 1, 1], gathered
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 11, 2, 8).to(dev) for _ in range(3))
        mask = torch.ones(1, 11, dtype=torch.bool, device=dev)
        mask[0, 9] = False
        mine = slice(0, 5) if rank == 0 else slice(5, 11)  # uneven shards: the SP length exchange runs
        got = sp_attention(q[:, mine], k[:, mine], v[:, mine], key_padding_mask=mask[:, mine],
                           mesh=SPMesh.from_mesh(mesh))
        err = (got - sp_attention(q, k, v, key_padding_mask=mask)[:, mine]).abs().max().item()
        assert err < 1e-4, f"ulysses attention over uneven shards: {err}"
        if rank == 0:
            fanout.send(Batch(items=[]))
            fanout.send(Stop())
        else:
            assert [type(fanout.recv()).__name__ for _ in range(2)] == ["Batch", "Stop"]
        g.barrier()
    finally:
        fanout.close()
        mesh.destroy()


def check_two_ranks(run: Run) -> str:
    if run.gpus < 2:
        raise Skip(f"needs two GPUs, this machine has {run.gpus}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        procs = [ctx.Process(target=_two_rank_worker, args=(r, run.device, f"{tmp}/store", tmp)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(180)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = [e.read_text() for e in sorted(Path(tmp).glob("rank*.err"))]
        if errors or any(p.exitcode != 0 for p in procs):
            raise AssertionError(f"exit codes {[p.exitcode for p in procs]}: {errors[0] if errors else 'timed out'}")
    backend = "nccl" if run.device == "cuda" else "gloo"
    return (f"2 ranks on {backend}: objects, tensor dicts, all_gather, Ulysses attention over uneven shards, "
            "the rank fan-out")


CHECKS: list[tuple[str, Callable[[Run], str]]] = [
    ("served fp32", check_served_fp32),
    ("served bf16", check_served_bf16),
    ("flash-attn", check_flash_attn),
    ("world-1 groups", check_world1),
    ("2-rank mesh + fan-out", check_two_ranks),
    ("served ulysses 2", _served_layout(ulysses=2)),
    ("served cfg 2", _served_layout(cfg=2)),
    ("served hsdp_shard 2", _served_layout(hsdp_shard=2)),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--budget-s", type=float, default=600.0, help="start no check after this many seconds")
    p.add_argument("--only", default="", help="comma-separated check names (default: all)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device on this machine (torch {torch.__version__} sees none): nothing to check")
        return 0
    gpus = torch.cuda.device_count() if args.device == "cuda" else 2
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"gpu_check on {where} x {gpus if args.device == 'cuda' else 1}, torch {torch.__version__}", flush=True)
    run = Run(args.device, ensure_model("tiny"), gpus)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    start, counts = time.monotonic(), {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for name, check in CHECKS:
        if only and name not in only:
            continue
        t0 = time.monotonic()
        if t0 - start > args.budget_s:
            status, detail = "SKIP", f"the {args.budget_s:.0f} s budget is spent"
        else:
            try:
                status, detail = "PASS", check(run)
            except Skip as e:
                status, detail = "SKIP", str(e)
            except Exception as e:  # noqa: BLE001 - a failed check is a line, the others still run
                status, detail = "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
        counts[status] += 1
        print(f"{status} {name}: {detail} ({time.monotonic() - t0:.1f}s)", flush=True)
    print(f"gpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
          f"{time.monotonic() - start:.0f}s", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
