"""The main function of one rank process of a stage replica: set the process up, load the engine, run the shell.

:func:`worker_main` names the process, sets up logging, starts the parent watchdog, joins the replica's
torch.distributed world (:func:`_init_distributed`), loads the stage's engine (``stages.engine``) and hands it to
the process shell (``runtime.stage_shell``): the driver loop on rank 0, the follower loop on the others. The
driver announces Ready once every rank has loaded its weights (a barrier).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import msgspec

logger = logging.getLogger(__name__)


class WorkerSpec(msgspec.Struct, kw_only=True):
    stage: str
    replica: int
    rank: int
    world_size: int
    master_port: int
    model_path: str
    dtype: str
    device: str
    in_addr: str            # the driver binds its work socket here
    out_addr: str           # the orchestrator's result socket
    max_batch_size: int
    batch_timeout_ms: float
    instance: str
    parent_pid: int
    parallel: dict[str, int]
    threads: int = 1
    pool_outputs: bool = False  # publish through reused segments (the next stage has one rank, the sole reader)
    log_level: str = "INFO"


def title(spec: WorkerSpec) -> str:
    return f"omni-runtime: {spec.stage}[{spec.replica}] rank {spec.rank}/{spec.world_size}"


def _watch_parent(parent_pid: int) -> None:
    # A rank must never outlive the frontend that launched it (no orphans, even after a SIGKILL of the frontend).
    while True:
        time.sleep(0.5)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(0)


def _init_distributed(spec: WorkerSpec) -> Any:
    """Join the replica's torch.distributed world and build its parallel groups; returns the stage's mesh (None
    while the groups live in ``parallel.state``)."""
    import torch.distributed as dist

    init = f"tcp://127.0.0.1:{spec.master_port}"
    try:
        from omni_runtime.parallel import state
    except ImportError:
        state = None
    if state is not None and hasattr(state, "init_distributed_environment"):
        state.init_distributed_environment(world_size=spec.world_size, rank=spec.rank,
                                           distributed_init_method=init, local_rank=spec.rank, backend="gloo")
        if spec.stage == "denoiser":
            p = spec.parallel
            state.initialize_model_parallel(ulysses_degree=p.get("ulysses", 1), ring_degree=p.get("ring", 1),
                                            backend="gloo")
    else:
        dist.init_process_group("gloo", init_method=init, rank=spec.rank, world_size=spec.world_size)
        if spec.stage == "denoiser" and spec.world_size > 1:
            raise RuntimeError("the denoiser is configured with sequence parallelism but parallel/state.py is "
                               "not available in this build")
    return None


def worker_main(spec_bytes: bytes) -> None:
    """Entry point of a rank process (``multiprocessing`` target); ``spec_bytes`` is a msgspec-encoded spec."""
    spec = msgspec.msgpack.decode(spec_bytes, type=WorkerSpec)
    # Ctrl-C in a terminal reaches the whole process group; the frontend decides how the stages stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["OMNI_RUNTIME_INSTANCE"] = spec.instance
    name = title(spec)
    try:
        import setproctitle

        setproctitle.setproctitle(name)
    except ImportError:  # pragma: no cover - it is a dependency
        pass
    logging.basicConfig(level=spec.log_level, force=True, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s")
    threading.Thread(target=_watch_parent, args=(spec.parent_pid,), daemon=True).start()

    import torch

    torch.set_num_threads(max(1, spec.threads))
    mesh = _init_distributed(spec) if spec.world_size > 1 else None

    from omni_runtime.runtime import stage_shell, tensor_handoff
    from omni_runtime.runtime.rank_fanout import RankFanout
    from omni_runtime.runtime.stage_exec import StageExecutor
    from omni_runtime.stages.engine import load_engine

    engine = load_engine(spec.stage, spec.model_path, spec.dtype, spec.device, mesh=mesh)
    fanout = RankFanout(spec.rank, spec.world_size)
    if spec.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    logger.info("loaded; %s", "driver" if spec.rank == 0 else "follower")
    if spec.rank == 0:
        executor = StageExecutor(engine, spec.stage, spec.replica, max_batch_size=spec.max_batch_size,
                                 batch_timeout_ms=spec.batch_timeout_ms,
                                 publisher=tensor_handoff.Publisher(pooled=spec.pool_outputs))
        driver = stage_shell.Driver(executor, fanout, spec.in_addr, spec.out_addr)
        try:
            driver.run()
        finally:
            driver.close()
            executor.close()
    else:
        stage_shell.follow_loop(engine, fanout)
    fanout.close()
    tensor_handoff.shutdown()
    logger.info("stopped")
