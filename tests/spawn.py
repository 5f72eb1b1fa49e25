"""Spawn N real worker processes for a distributed test, and never hang.

Every distributed test calls :func:`run_workers`. Each child gets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and a free ``MASTER_PORT`` so it
can form a gloo group (and with ``init_process_group=True`` the helper forms it).

Failure handling:
- a child's exception is written as text (no pickle) and re-raised in the parent
  as :class:`WorkerFailed`, with the child's traceback in the message;
- when one child fails, the others get a short grace period, then are killed;
- past ``timeout`` every child dumps its stacks (faulthandler, SIGUSR1) into the
  report and is killed; every descendant is reaped.

Children start from a forkserver that has imported torch once: a fresh
interpreter per child (spawn) costs seconds, and plain fork after the parent has
used OpenMP deadlocks.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing as mp
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import msgspec

from omni_runtime.comm.processes import kill_tree
from omni_runtime.runtime.launcher import free_port

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.distributed"])


class WorkerFailed(AssertionError):
    """A worker raised, crashed, or ran out of time."""


def _child(fn, rank, world_size, port, workdir, args, init_pg, backend, threads):
    err_path = Path(workdir) / f"rank{rank}.err"
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    stack_file = open(Path(workdir) / f"rank{rank}.stack", "w")  # noqa: SIM115 (lives as long as the child)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    try:
        import torch

        torch.set_num_threads(threads)
        if init_pg:
            import torch.distributed as dist

            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    init_method=f"tcp://127.0.0.1:{port}")
        result = fn(rank, world_size, *args)
        if init_pg:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        (Path(workdir) / f"rank{rank}.out").write_bytes(msgspec.json.encode(result))
    except BaseException:
        err_path.write_text(traceback.format_exc())
        os._exit(1)


def _kill_tree(procs: Sequence[mp.process.BaseProcess]) -> None:
    kill_tree([p.pid for p in procs])
    for p in procs:
        p.join(timeout=5)


def run_workers(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: tuple = (),
    timeout: float = 60.0,
    init_process_group: bool = False,
    backend: str = "gloo",
    grace: float = 2.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes.

    ``fn`` must be a module-level function. Its return value must be
    JSON-encodable (msgspec.json); the list of them, by rank, is returned.
    """
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="omni-spawn-") as workdir:
        procs = [
            _CTX.Process(
                target=_child,
                args=(fn, r, world_size, port, workdir, args, init_process_group, backend, threads),
                name=f"worker-{r}",
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed_at: float | None = None
        try:
            while any(p.exitcode is None for p in procs):
                now = time.monotonic()
                limit = deadline if failed_at is None else min(deadline, failed_at + grace)
                if now >= limit:
                    break
                wait([p.sentinel for p in procs if p.exitcode is None], timeout=min(0.2, limit - now))
                if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                    failed_at = time.monotonic()
            timed_out = any(p.exitcode is None for p in procs) and failed_at is None
            if any(p.exitcode is None for p in procs):
                for p in procs:
                    if p.exitcode is None and p.pid is not None:
                        try:
                            os.kill(p.pid, signal.SIGUSR1)
                        except ProcessLookupError:
                            pass
                time.sleep(0.5)
        finally:
            _kill_tree(procs)

        report = []
        for r, p in enumerate(procs):
            err = Path(workdir) / f"rank{r}.err"
            if err.exists():
                report.append(f"--- rank {r} raised:\n{err.read_text()}")
            elif p.exitcode not in (0, None) and p.exitcode != -signal.SIGKILL:
                report.append(f"--- rank {r} died with exit code {p.exitcode}")
        if timed_out:
            stacks = []
            for r in range(world_size):
                sf = Path(workdir) / f"rank{r}.stack"
                if sf.exists() and sf.stat().st_size:
                    stacks.append(f"--- rank {r} stacks at timeout:\n{sf.read_text()[-4000:]}")
            raise WorkerFailed(
                f"{fn.__name__} with world size {world_size} timed out after {timeout:.0f}s\n"
                + "\n".join(report + stacks)
            )
        if report or any(p.exitcode != 0 for p in procs):
            codes = {r: p.exitcode for r, p in enumerate(procs)}
            raise WorkerFailed(f"{fn.__name__} failed; exit codes {codes}\n" + "\n".join(report))
        return [msgspec.json.decode((Path(workdir) / f"rank{r}.out").read_bytes()) for r in range(world_size)]


def on_mesh(rank: int, world_size: int, degrees: dict[str, int], store: str, fn: Callable[..., Any],
            *args: Any) -> Any:
    """A :func:`run_workers` worker: ``fn(*args, mesh)`` on this rank's ``Mesh`` of ``ParallelSpec(**degrees)`` (on
    CPU, formed through the file ``store``), destroyed afterwards. ``fn`` must be a module-level function."""
    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec

    mesh = Mesh.build(ParallelSpec(**degrees), rank, f"file://{store}", "cpu")
    try:
        return fn(*args, mesh)
    finally:
        mesh.destroy()


@contextlib.contextmanager
def parallel_state(**degrees: int) -> Iterator[None]:
    """In a worker: ``parallel.state``'s distributed environment and, given ``degrees``, its model-parallel groups
    (``initialize_model_parallel(**degrees)``), destroyed on the way out."""
    from omni_runtime.parallel import state

    state.init_distributed_environment()
    try:
        if degrees:
            state.initialize_model_parallel(**degrees)
        yield
    finally:
        state.destroy_distributed_environment()
