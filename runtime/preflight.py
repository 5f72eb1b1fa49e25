"""Checks that run before any stage process starts: ``omni-runtime check`` prints them, ``serve``, ``generate`` and
``batch`` run them first, so a problem is one line naming the key or file instead of tracebacks from the stages.

- **The machine** (:func:`check_machine`): the keys that set process and thread counts are bounded by what this
  machine has. On CPU every rank is a process: the ranks of all stages together (``replicas x world size`` per
  stage) and each stage's ``threads`` are at most ``CPU cores x OVERSUBSCRIPTION``. On CUDA each stage's ranks
  need a device each (``replicas x world size <= CUDA devices``; a ``devices`` entry must name one that exists),
  and what CUDA brings must be here (:func:`check_gpu`): a CUDA device at all, NCCL for a stage of several
  ranks, the ``deep_ep`` package for a DeepEP ``all2all_backend``.
  With ``[placement] launcher = "ray"`` Ray places the ranks instead: the check is that Ray is installed and that
  ``ray_address`` answers as a Ray head (``runtime.ray_connect.probe_ray_address``).
- **The host** (:func:`check_host`): ``server.host`` resolves.
- **The environment** (:func:`check_environment`): ``OMNI_RUNTIME_INSTANCE``, if set, is a valid instance prefix.
- **The pipeline** (:func:`pipeline_lines`): with ``pp > 1``, each pp rank's block range; more stages than the
  model has blocks is an error naming ``stages.denoiser.parallel.pp``.
- **The model** (:func:`check_model`): ``stages.model_check.check_model_dir`` (configs, tokenizers, safetensors
  headers), unless the directory is the embedded tiny model that is created on first use.
- **The family** (:func:`check_family`): the model family (``model_index.json`` ``_class_name``), its
  components, parallel modes and request fields; a parallel mode the family cannot run is an error naming the key.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from omni_runtime.runtime.config import STAGE_NAMES, ConfigError, RuntimeConfig

logger = logging.getLogger(__name__)

# Rank processes and torch threads per CPU core that a config may ask for. The default config runs 3 ranks, the
# shipped usp4 config 6; 4 per core leaves room for replicas while a typo (threads = 100000, ulysses = 1000) stays
# far from exhausting the machine's process limit.
OVERSUBSCRIPTION = 4


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, as the launcher counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _uses_cuda(cfg: RuntimeConfig) -> bool:
    return cfg.model.device == "cuda" or any(
        d.startswith("cuda") for name in STAGE_NAMES for d in cfg.stages.get(name).devices)


#: all2all backends that need a GPU kernel package: backend -> the module to import
GPU_ALL2ALL_MODULES: dict[str, str] = {"deepep_high_throughput": "deep_ep", "deepep_low_latency": "deep_ep"}


def _cuda_key(cfg: RuntimeConfig) -> str:
    """The config key that asks for CUDA: ``model.device`` or the first stage's ``devices`` with a cuda entry."""
    if cfg.model.device == "cuda":
        return "model.device = 'cuda'"
    name = next(n for n in STAGE_NAMES if any(d.startswith("cuda") for d in cfg.stages.get(n).devices))
    return f"stages.{name}.devices = {cfg.stages.get(name).devices!r}"


def check_gpu(cfg: RuntimeConfig, gpus: int, nccl: bool | None = None,
              importable: Callable[[str], bool] | None = None) -> None:
    """Raise :class:`ConfigError` (one line naming the key) when ``cfg`` asks for CUDA and this machine lacks what
    that needs: a CUDA device, NCCL for a stage of several ranks (its device groups), the kernel package of a GPU
    all2all backend. ``nccl`` / ``importable``: what this machine has (default: asked of torch and importlib)."""
    import importlib.util

    import torch
    import torch.distributed as dist

    if gpus == 0:
        raise ConfigError(f"{_cuda_key(cfg)}: this machine has no CUDA device (torch {torch.__version__} sees none); "
                          "allowed: model.device = 'cpu' and no cuda entries in stages.*.devices")
    nccl = (dist.is_available() and dist.is_nccl_available()) if nccl is None else nccl
    for name in STAGE_NAMES:
        st = cfg.stages.get(name)
        if st.world_size > 1 and not nccl:
            raise ConfigError(f"stages.{name}: {st.world_size} ranks on CUDA exchange tensors over NCCL, which this "
                              f"torch build lacks (torch.distributed.is_nccl_available() is False); allowed: one "
                              f"rank per replica, or model.device = 'cpu'")
    backend = cfg.stages.denoiser.parallel.all2all_backend
    module = GPU_ALL2ALL_MODULES.get(backend)
    importable = importable or (lambda m: importlib.util.find_spec(m) is not None)
    if module is not None and not importable(module):
        raise ConfigError(f"stages.denoiser.parallel.all2all_backend = {backend!r}: needs the {module!r} package, "
                          f"which is not importable here; allowed: 'naive', 'agrs', 'alltoallv'")
    if module is not None and cfg.model.dtype != "bfloat16":
        raise ConfigError(f"stages.denoiser.parallel.all2all_backend = {backend!r} with model.dtype = "
                          f"{cfg.model.dtype!r}: DeepEP's kernels take bfloat16 tokens; allowed: model.dtype = "
                          f"'bfloat16', or all2all_backend 'naive', 'agrs', 'alltoallv'")


def check_machine(cfg: RuntimeConfig, cores: int | None = None, gpus: int | None = None, nccl: bool | None = None,
                  importable: Callable[[str], bool] | None = None) -> str:
    """Raise :class:`ConfigError` naming the key, its value and the limit with its arithmetic when ``cfg`` asks
    for more processes, threads or devices than this machine has, or for CUDA where it lacks what that needs
    (:func:`check_gpu`); returns a one-line summary. ``cores``, ``gpus``, ``nccl``, ``importable``: what the
    machine has (default: asked)."""
    if cfg.placement.launcher == "ray":  # the ranks run where Ray places them, not necessarily on this machine
        from omni_runtime.runtime.ray_connect import import_ray, probe_ray_address

        import_ray()
        probe_ray_address(cfg.placement.ray_address)
        total = sum(cfg.stages.get(n).replicas * cfg.stages.get(n).world_size for n in STAGE_NAMES)
        where = repr(cfg.placement.ray_address) if cfg.placement.ray_address else "a private instance"
        return f"machine: {total} rank(s) as Ray actors on {where} (Ray places them; no per-machine limits here)"
    cores = cpu_cores() if cores is None else cores
    limit = cores * OVERSUBSCRIPTION
    why = f"{cores} CPU core(s) x oversubscription factor {OVERSUBSCRIPTION}"
    ranks: dict[str, int] = {}
    for name in STAGE_NAMES:
        st = cfg.stages.get(name)
        if st.threads > limit:
            raise ConfigError(f"stages.{name}.threads = {st.threads}: at most {limit} on this machine ({why})")
        if st.replicas > limit:
            raise ConfigError(f"stages.{name}.replicas = {st.replicas}: at most {limit} on this machine ({why})")
        ranks[name] = st.replicas * st.world_size
        if ranks[name] > limit:
            raise ConfigError(f"stages.{name}: replicas x world size = {st.replicas} x {st.world_size} = "
                              f"{ranks[name]} rank processes (see its parallel degrees); at most {limit} on this "
                              f"machine ({why})")
    total = sum(ranks.values())
    if total > limit:
        terms = " + ".join(f"{n} {r}" for n, r in ranks.items())
        raise ConfigError(f"stages.*.replicas and parallel degrees: {terms} = {total} rank processes in all; at "
                          f"most {limit} on this machine ({why})")
    summary = f"machine: {total} rank process(es) of at most {limit} ({why})"
    if _uses_cuda(cfg):
        gpus = cuda_devices() if gpus is None else gpus
        check_gpu(cfg, gpus, nccl, importable)
        for name in STAGE_NAMES:
            st = cfg.stages.get(name)
            for i, d in enumerate(st.devices):
                if d.startswith("cuda:") and int(d[5:]) >= gpus:
                    raise ConfigError(f"stages.{name}.devices[{i}] = {d!r}: this machine has {gpus} CUDA "
                                      f"device(s)" + (f"; allowed: cuda:0 to cuda:{gpus - 1}" if gpus else ""))
            if not st.devices and cfg.model.device == "cuda" and ranks[name] > gpus:
                raise ConfigError(f"stages.{name}: replicas x world size = {st.replicas} x {st.world_size} = "
                                  f"{ranks[name]} ranks on model.device = 'cuda' need one CUDA device each; this "
                                  f"machine has {gpus}")
        summary += f", {gpus} CUDA device(s)"
    return summary


def check_host(cfg: RuntimeConfig) -> str:
    """``server.host`` must resolve (binding is tried by ``serve`` itself, just before it starts the stages)."""
    host = cfg.server.host
    try:
        addrs = socket.getaddrinfo(host, cfg.server.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"server.host = {host!r}: cannot be resolved ({reason}); allowed: an address or a "
                          f"name of this machine, e.g. '127.0.0.1'") from None
    return f"server.host {host!r} resolves to {addrs[0][4][0]}"


def check_model(cfg: RuntimeConfig) -> list[str]:
    """The model directory (configs, tokenizers, safetensors headers); a ``CheckpointError`` names the file."""
    from omni_runtime.runtime.model_store import model_status

    status = model_status(cfg.model.path)
    if status != "present":
        return [f"model directory: {status}"]
    from omni_runtime.stages.model_check import check_model_dir

    return ["model directory: present"] + [f"  {line}" for line in check_model_dir(Path(cfg.model.path))]


def model_family(cfg: RuntimeConfig):  # -> stages.models.family.ModelFamily (stages import torch: kept lazy)
    """The model family of ``model.path``: from its ``model_index.json``, or the embedded model's still to make."""
    from omni_runtime.runtime.model_store import GENERATED_NAMES
    from omni_runtime.stages.models.family import family_for_class, family_of

    path = Path(cfg.model.path)
    if not (path / "model_index.json").is_file() and path.name in GENERATED_NAMES:
        return family_for_class(GENERATED_NAMES[path.name][0])
    return family_of(path)


def _transformer_config(cfg: RuntimeConfig, family) -> dict | None:
    from omni_runtime.runtime.model_store import GENERATED_NAMES

    config_path = Path(cfg.model.path) / "transformer" / "config.json"
    if config_path.is_file():
        return json.loads(config_path.read_text())
    if Path(cfg.model.path).name in GENERATED_NAMES:
        return family.tiny_transformer_config(GENERATED_NAMES[Path(cfg.model.path).name][1])
    return None


def pipeline_lines(cfg: RuntimeConfig) -> list[str]:
    """Each pp rank's block range, from the model's transformer config (the embedded preset's when the model is
    still to be created); a model with fewer blocks than ``pp`` is a :class:`ConfigError` naming the key."""
    from omni_runtime.parallel.strategies.pipeline_parallel import PipelineError
    from omni_runtime.runtime.layout import pp_block_lines

    family = model_family(cfg)
    config = _transformer_config(cfg, family)
    if config is None:
        return ["  pp stages: the model's transformer config is not readable; block ranges unknown"]
    try:
        return pp_block_lines(cfg.stages.denoiser.parallel, family.blocks(config))
    except PipelineError as e:
        raise ConfigError(str(e)) from None


def _modes_in_use(cfg: RuntimeConfig) -> list[tuple[str, str]]:
    """(parallel mode, the config key and value that turn it on) for every mode ``cfg`` uses."""
    den, te, vae = cfg.stages.denoiser, cfg.stages.text_encoder, cfg.stages.vae
    p = den.parallel
    used = [("ulysses", f"stages.denoiser.parallel.ulysses = {p.ulysses}", p.ulysses > 1),
            ("ring", f"stages.denoiser.parallel.ring = {p.ring}", p.ring > 1),
            ("cfg", f"stages.denoiser.parallel.cfg = {p.cfg}", p.cfg > 1),
            ("pp", f"stages.denoiser.parallel.pp = {p.pp}", p.pp > 1 and p.pp_mode == "layer"),
            ("pipefusion", f"stages.denoiser.parallel.pp_mode = {p.pp_mode!r}", p.pp > 1 and p.pp_mode == "pipefusion"),
            ("hsdp_shard", f"stages.denoiser.parallel.hsdp_shard = {p.hsdp_shard}", p.hsdp_shard > 1),
            ("hsdp_shard", f"stages.text_encoder.parallel.hsdp_shard = {te.parallel.hsdp_shard}",
             te.parallel.hsdp_shard > 1),
            ("ep", f"stages.denoiser.parallel.ep = {p.ep}", p.ep > 1),
            ("vae_patch", f"stages.vae.parallel.patch = {vae.parallel.vae_patch}", vae.parallel.vae_patch > 1),
            ("mixed_sizes", "stages.denoiser.mixed_sizes = true", den.mixed_sizes)]
    return [(mode, key) for mode, key, on in used if on]


def check_family(cfg: RuntimeConfig) -> list[str]:
    """The model family and what it supports; a parallel mode it cannot run is a :class:`ConfigError` naming the
    key, the family and the reason."""
    family = model_family(cfg)
    for mode, key in _modes_in_use(cfg):
        if mode in family.unsupported:
            raise ConfigError(f"{key}: the {family.name} family ({', '.join(family.pipeline_classes)}) does not "
                              f"support {mode}: {family.unsupported[mode]}")
    return family.describe()


def check_environment(environ: dict[str, str] | None = None) -> str:
    """``OMNI_RUNTIME_INSTANCE`` (the prefix of this runtime's instance id, its run directory and shm segments), if
    set, must be 1-64 characters from ``[A-Za-z0-9.-]``; returns a one-line summary."""
    from omni_runtime.comm.instance import INSTANCE_ENV, valid_instance

    value = (os.environ if environ is None else environ).get(INSTANCE_ENV)
    if value is None:
        return f"instance: {INSTANCE_ENV} not set (the id is derived from the pid)"
    if not valid_instance(value):
        raise ConfigError(f"environment variable {INSTANCE_ENV} = {value!r}: allowed values are 1-64 characters "
                          f"from [A-Za-z0-9.-] (letters, digits, '.' and '-'), or leave it unset")
    return f"instance: {INSTANCE_ENV} = {value!r} (the prefix of the instance id)"


def preflight(cfg: RuntimeConfig, model: bool = True) -> list[str]:
    """Every check above, machine first; returns the lines ``check`` prints. Raises on the first problem."""
    lines = [check_machine(cfg), check_host(cfg), check_environment()]
    if model:
        lines += check_model(cfg)
        lines += check_family(cfg)
    if cfg.stages.denoiser.parallel.pp > 1:
        pipeline_lines(cfg)  # raises for more stages than blocks; ``check`` prints the ranges with the placement
    return lines
