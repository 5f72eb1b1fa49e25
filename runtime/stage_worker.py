"""The main function of one rank process of a stage replica: set the process up, load the engine, run the shell.

:func:`worker_main` names the process, sets up logging, joins the replica's
torch.distributed world (:func:`_init_distributed`), loads the stage's engine (``stages.engine``) and hands it to
the process shell (``runtime.stage_shell``): the driver loop on rank 0, the follower loop on the others. The
driver announces Ready once every rank has loaded its weights (a barrier). From its start to its end every rank runs
a heartbeat thread (``runtime.stage_shell.Heartbeat``, ``runtime.liveness``). The parent watchdog and the placement's
environment are set up before, by the launcher's ``_rank_main``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.runtime.liveness import Busy
    from omni_runtime.runtime.rank_fanout import RankFanout

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
    max_batch_pixels: int = 0       # width x height summed over one batch (0: no cap)
    instance: str
    parent_pid: int
    parallel: dict[str, int | str | bool]  # ParallelSpec's fields (hsdp_release_memory: a bool)
    threads: int = 1
    pool_outputs: bool = False  # publish through reused segments (the next stage has one rank, the sole reader)
    vae_tiling: bool = False  # [stages.vae] tiling (diffusers' approximate tiled decode)
    scheduling: str = "request"     # [stages.denoiser] scheduling ("step" | "request")
    batch_invariant: bool = False   # [stages.denoiser] batch_invariant
    priority_aging_s: float = 10.0  # [stages.denoiser] priority_aging_s
    mixed_sizes: bool = False       # [stages.denoiser] mixed_sizes
    max_padding_waste: float = 0.25  # [stages.denoiser] max_padding_waste
    cpu_linear: str = "onednn"      # [stages.denoiser] cpu_linear
    compile: bool = False           # [stages.denoiser] compile
    lora_max_loaded: int = 8        # [lora] max_loaded
    lora_adapters: dict[str, str] = msgspec.field(default_factory=dict)  # [lora] adapters: preloaded (denoiser)
    log_level: str = "INFO"
    # From the Placement (runtime/placement.py); defaults keep older callers working.
    rendezvous: str = ""            # torch.distributed init_method ("file://<run dir>/..." on one node)
    local_rank: int = -1            # index on its node (-1: same as rank)
    node: str = ""                  # the node it runs on
    tensor_transport: str = "shm"   # how this replica's outputs reach the next stage: "shm" | "frames"
    tensor_endpoint: str = ""       # "frames": where the output rank's tensor server binds
    compute_token: str = ""         # [placement] cpu_sharing = "exclusive": the node's turn file (runtime.cores)
    generation: int = 0             # the replica's start count (its heartbeats name it: runtime.liveness)
    stall_timeout_s: float = 0.0    # [server] stall_timeout_s (0: no heartbeat thread)
    device_backend: str = ""        # the device groups' torch.distributed backend ("": nccl on CUDA, gloo on CPU)


def stage_options(stage: str, vae_tiling: bool = False, batch_invariant: bool = False,
                  mixed_sizes: bool = False, cpu_linear: str = "onednn",
                  lora_max_loaded: int = 8, lora_adapters: dict[str, str] | None = None, compile: bool = False
                  ) -> dict[str, bool | str | int | dict[str, str]]:
    """The engine load options of ``stage`` (``stages.engine.load_engine``)."""
    if stage == "vae":
        return {"tiling": vae_tiling}
    if stage == "denoiser":
        return {"batch_invariant": batch_invariant, "mixed_sizes": mixed_sizes, "cpu_linear": cpu_linear,
                "lora_max_loaded": lora_max_loaded, "lora_preload": dict(lora_adapters or {}), "compile": compile}
    return {}


def title(spec: WorkerSpec) -> str:
    return f"omni-runtime: {spec.stage}[{spec.replica}] rank {spec.rank}/{spec.world_size}"


def _init_distributed(spec: WorkerSpec) -> Mesh:
    """Build this rank's :class:`~parallel.mesh.Mesh` (torch.distributed included; the backend follows the device:
    nccl for CUDA, gloo for CPU) from the stage's parallel degrees, on the placement's rendezvous."""
    import torch

    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec

    pspec = msgspec.convert(spec.parallel, ParallelSpec)
    pspec.check_world_size(spec.world_size)
    device = torch.device(spec.device if spec.device != "cuda" else f"cuda:{spec.rank}")
    init = spec.rendezvous or f"tcp://127.0.0.1:{spec.master_port}"
    return Mesh.build(pspec, spec.rank, init, device, device_backend=spec.device_backend or None)


def start_rank(spec: WorkerSpec) -> tuple[Mesh | None, Any, RankFanout]:
    """What every rank does before it serves: join the replica's world (its mesh), load the engine, build the rank
    fan-out over the mesh's gloo world group, and wait for every rank to have loaded (a barrier on that group)."""
    mesh = _init_distributed(spec) if spec.world_size > 1 else None

    from omni_runtime.runtime.rank_fanout import RankFanout
    from omni_runtime.stages.engine import load_engine

    options = stage_options(spec.stage, spec.vae_tiling, spec.batch_invariant, spec.mixed_sizes, spec.cpu_linear,
                            spec.lora_max_loaded, spec.lora_adapters, spec.compile)
    engine = load_engine(spec.stage, spec.model_path, spec.dtype, spec.device, mesh=mesh, **options)
    fanout = RankFanout(spec.rank, spec.world_size, mesh)
    if mesh is not None:
        mesh.group("world").barrier()  # on the gloo group: NCCL would refuse the CPU tensor of a barrier
    return mesh, engine, fanout


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

    from omni_runtime.runtime import liveness, stage_shell
    from omni_runtime.runtime.messages import Heartbeat

    busy = liveness.Busy()
    beat = None
    if spec.stall_timeout_s > 0:
        beat = stage_shell.Heartbeat(spec.out_addr, Heartbeat(
            stage=spec.stage, replica=spec.replica, rank=spec.rank, generation=spec.generation, pid=os.getpid()),
            busy, liveness.heartbeat_interval(spec.stall_timeout_s)).start()
    try:
        _run(spec, busy)
    finally:
        if beat is not None:
            beat.stop()


def _run(spec: WorkerSpec, busy: Busy) -> None:
    import torch

    torch.set_num_threads(max(1, spec.threads))
    _mesh, engine, fanout = start_rank(spec)
    compile_log = getattr(getattr(engine, "stage", None), "compile_log", None)
    if compile_log is not None:  # [stages.denoiser] compile: a graph compiling is no stalled step (stages.compile)
        compile_log.excuse(busy.paused)

    from omni_runtime.runtime import cores, stage_shell, tensor_handoff
    from omni_runtime.runtime.peak_memory import PeakMemory
    from omni_runtime.runtime.stage_exec import StageExecutor

    logger.info("loaded; %s", "driver" if spec.rank == 0 else "follower")
    if spec.rank == 0:
        token = (cores.ComputeToken(spec.compute_token, label=f"{spec.stage}[{spec.replica}]")
                 if spec.compute_token else None)
        busy.token = token  # its heartbeat says who holds the turn while it waits (runtime.liveness)
        executor = StageExecutor(engine, spec.stage, spec.replica, max_batch_size=spec.max_batch_size,
                                 batch_timeout_ms=spec.batch_timeout_ms, max_batch_pixels=spec.max_batch_pixels,
                                 scheduling=spec.scheduling, priority_aging_s=spec.priority_aging_s,
                                 max_padding_waste=spec.max_padding_waste if spec.mixed_sizes else None,
                                 publisher=tensor_handoff.Publisher(
                                     pooled=spec.pool_outputs, transport=spec.tensor_transport,
                                     endpoint=spec.tensor_endpoint), token=token, busy=busy,
                                 memory=PeakMemory(_mesh.device if _mesh is not None else spec.device))
        driver = stage_shell.Driver(executor, fanout, spec.in_addr, spec.out_addr)
        try:
            driver.run()
        finally:
            driver.close()
            executor.close()
    else:
        stage_shell.follow_loop(engine, fanout, busy)
    fanout.close()
    tensor_handoff.shutdown()
    logger.info("stopped")
