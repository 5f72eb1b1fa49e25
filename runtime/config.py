"""The runtime's TOML configuration: parsed with stdlib ``tomllib``, checked key by key, held in msgspec Structs.

Every mistake a user can make in a config file (an unknown key, a value of the wrong type, an impossible or
not-yet-supported parallel degree) raises one :class:`ConfigError` whose message names the key path, the value
and what is allowed, e.g. ``stages.denoiser.parallel.ulysses = 0: must be an integer >= 1``.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

import msgspec

from omni_runtime.parallel.parallel_spec import (
    ALL2ALL_BACKEND_NAMES,
    CPU_ALL2ALL_BACKEND_NAMES,
    PP_MODES,
    ParallelSpec,
    ParallelSpecError,
    hsdp_world_error,
    model_degrees_text,
)
from omni_runtime.stages.cache_config import CACHE_FIELDS, CacheConfig, allowed_text, parse_cache
from omni_runtime.stages.compile import PIPEFUSION, REFUSED_LAYOUTS
from omni_runtime.stages.cpu_linear import CPU_LINEAR

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

STAGE_NAMES = ("text_encoder", "denoiser", "vae")
PIXEL_STAGES = ("denoiser", "vae")  # the stages whose batches have a max_batch_pixels cap
DEFAULT_MAX_PIXELS_STEPS = 1 << 26  # [server] max_pixels_steps
DEFAULT_MAX_BATCH_PIXELS = 1 << 22  # [stages.denoiser|vae] max_batch_pixels: one 2048x2048, 64 x 256x256

# The parallel keys of each stage's ``[stages.<name>.parallel]`` table (they parse straight into
# ``parallel.parallel_spec.ParallelSpec``; the VAE's ``patch`` is the spec's ``vae_patch``).
DENOISER_PARALLEL_KEYS = ("ulysses", "ring", "cfg", "pp", "dp", "tp", "hsdp_shard", "hsdp_replicate", "ep")
# ... and the one key of the denoiser's table that is not a degree: how the expert-parallel group moves MoE tokens
# (``ParallelSpec.all2all_backend``, one of ``ALL2ALL_BACKEND_NAMES``)
DENOISER_PARALLEL_CHOICES = ("all2all_backend", "pp_mode")
# ... and its pipeline counts (integers >= 0, 0 = the default; ``ParallelSpec.pp_microbatches`` etc.)
DENOISER_PARALLEL_COUNTS = ("pp_microbatches", "pipefusion_patches", "pipefusion_warmup")
VAE_PARALLEL_KEYS = ("patch",)
TEXT_ENCODER_PARALLEL_KEYS = ("hsdp_shard", "hsdp_replicate")
# Branches a Flux request runs per denoising step at most (true CFG: conditional + unconditional); with
# ``max_batch_size`` requests a step has at most this many rows per request to spread over the cfg ranks.
DENOISER_MAX_BRANCHES = 2
# Degrees whose implementation exists in ``parallel``/``stages`` and is wired into the stage processes.
# Anything else > 1 is rejected with "not supported yet" instead of silently running unsharded.
# ``dp`` > 1 only together with ``ep`` (the EP group's data-parallel ranks, see ``_check_expert_parallel``).
SUPPORTED_DENOISER_DEGREES = frozenset({"ulysses", "ring", "cfg", "pp", "ep", "hsdp_shard", "hsdp_replicate"})
SUPPORTED_TEXT_ENCODER_DEGREES = frozenset(TEXT_ENCODER_PARALLEL_KEYS)
SUPPORTED_VAE_DEGREES: frozenset[str] = frozenset({"patch"})


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key path, the value and what is allowed."""


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str
    dtype: str = "float32"
    device: str = "cpu"


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""
    max_queue: int = 64
    request_timeout_s: float = 600.0
    # Work caps (0 = no cap): n x W x H x steps of one request. 2**26 = 1024 x 1024 x 64, ~5 s of the tiny
    # model's denoiser on 2 CPU cores (docs/USAGE.md, "Work caps").
    max_pixels_steps: int = DEFAULT_MAX_PIXELS_STEPS
    metrics_require_key: bool = False  # GET /metrics needs the api_key too
    # uvicorn/h11 connection limits (docs/USAGE.md, "Connection limits").
    keep_alive_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    header_timeout_s: float = 10.0  # a connection must send a request's complete headers within this
    body_timeout_s: float = 30.0  # ... and its complete body within this after the headers
    max_connections: int = 256  # open connections (and requests in flight) beyond this get 503
    # A rank silent (no heartbeat) or in one step/collective this long is hung: its replica is killed and
    # restarted (docs/USAGE.md, "Hung ranks"); 0 turns the watch off.
    stall_timeout_s: float = 30.0
    # POST /v1/images/edits: input images per request, bytes of one image file, pixels (W x H) of one image
    # (docs/USAGE.md, "Image edits").
    max_edit_images: int = 4
    max_edit_image_bytes: int = 16 << 20
    max_edit_image_pixels: int = 4096 * 4096


class StageConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    replicas: int = 1
    max_batch_size: int = 8
    batch_timeout_ms: float = 0.0  # the most a busy stage waits to top up a batch; an idle one never waits
    devices: list[str] = msgspec.field(default_factory=list)
    threads: int = 0  # torch threads per rank; 0 = auto (the stage's ranks split the cores)
    # n x W x H summed over one batch (denoiser and vae; not a key of [stages.text_encoder]); 0 = no cap.
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS
    # [placement] launcher = "ray" only: the strategy of each replica's placement group, and extra Ray resources
    # every rank of the stage asks for (custom node labels, e.g. {"big_node" = 1}, pin the stage to such nodes).
    ray_strategy: str = "PACK"
    ray_resources: dict[str, float] = msgspec.field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return 1


class TextEncoderStageConfig(StageConfig, kw_only=True):
    # Only the HSDP degrees: a replica of hsdp_shard x hsdp_replicate ranks, each holding 1/hsdp_shard of the
    # encoders' weights, every rank encoding the whole batch.
    parallel: ParallelSpec = msgspec.field(default_factory=ParallelSpec)

    @property
    def world_size(self) -> int:
        return self.parallel.world_size


SCHEDULING = ("step", "request")  # [stages.denoiser] scheduling


class DenoiserCacheConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[stages.denoiser.cache]``: the cache acceleration of requests that name none (``stages.block_cache``);
    ``method = "none"`` (the default): off."""

    method: str = "none"
    threshold: float = 0.05
    fn: int = 1
    bn: int = 0
    warmup_steps: int = 0
    max_cached_steps: int = 0

    def given(self) -> dict[str, Any]:
        """The keys that differ from their defaults, and the method."""
        default = DenoiserCacheConfig()
        return {"method": self.method, **{k: getattr(self, k) for k in self.__struct_fields__
                                          if k != "method" and getattr(self, k) != getattr(default, k)}}

    def request_default(self) -> CacheConfig | None:
        """What a request without a ``cache`` field gets (None: off)."""
        if self.method == "none":
            return None
        keys = CACHE_FIELDS.get(self.method, {})
        return parse_cache({k: v for k, v in {**self.given(), "threshold": self.threshold}.items() if k in keys},
                           "stages.denoiser.cache")


class DenoiserStageConfig(StageConfig, kw_only=True):
    parallel: ParallelSpec = msgspec.field(default_factory=ParallelSpec)
    # "step": requests join and leave the running set at every denoising step (continuous batching);
    # "request": a batch of one size, step count and CFG flag runs from its first step to its last.
    scheduling: str = "step"
    batch_invariant: bool = False  # one forward per request: bit-identical to its solo run, no batching gain
    priority_aging_s: float = 10.0  # a waiting request's priority rises by 1 per this many seconds (step-level)
    # step-level: requests of different image sizes (same text length) share a forward, padded to the longest row
    # and the padding masked out of attention, while the padded fraction of its image tokens <= max_padding_waste
    mixed_sizes: bool = False
    max_padding_waste: float = 0.25
    # the kernel of the transformer's linear layers on CPU in float32 (stages/cpu_linear.py): "onednn" or "torch"
    cpu_linear: str = "onednn"
    # torch.compile of the transformer's blocks (stages/compile.py); the warm-up sizes ("WxH") run at start
    compile: bool = False
    compile_warmup: list[str] = msgspec.field(default_factory=lambda: ["1024x1024"])
    # the cache acceleration of requests without a ``cache`` field (off by default)
    cache: DenoiserCacheConfig = msgspec.field(default_factory=DenoiserCacheConfig)

    @property
    def world_size(self) -> int:
        return self.parallel.world_size


class VaeStageConfig(StageConfig, kw_only=True):
    parallel: ParallelSpec = msgspec.field(default_factory=ParallelSpec)
    tiling: bool = False  # diffusers' tiled decode: approximate, single rank; patch parallelism is the exact one

    @property
    def world_size(self) -> int:
        return self.parallel.world_size


class StagesConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    text_encoder: TextEncoderStageConfig = msgspec.field(default_factory=TextEncoderStageConfig)
    denoiser: DenoiserStageConfig = msgspec.field(default_factory=DenoiserStageConfig)
    vae: VaeStageConfig = msgspec.field(default_factory=VaeStageConfig)

    def get(self, name: str) -> StageConfig:
        return getattr(self, name)


TENSOR_TRANSPORTS = ("auto", "shm", "frames")
LAUNCHERS = ("local", "ray")
CPU_SHARING = ("auto", "exclusive", "concurrent")  # runtime/cores.py
RAY_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
# Resources Ray sets from other keys: a rank's CPUs are its threads, its GPU comes from model.device.
RAY_RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
_RAY_ADDRESS = re.compile(r"^(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class PlacementConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # How tensors travel between stages: "auto" (shm handles on one node, ZMQ frames across nodes), or forced.
    tensor_transport: str = "auto"
    # Who starts the rank processes: "local" (processes on this node) or "ray" (Ray actors, on any node).
    launcher: str = "local"
    # launcher = "ray": "" starts a private Ray instance for this run; "auto" or "host:port" joins a cluster.
    ray_address: str = ""
    # How the stages on one node share its CPU cores: "auto", "exclusive" (they take turns computing) or
    # "concurrent" (runtime/cores.py, docs/USAGE.md "Cores on CPU").
    cpu_sharing: str = "auto"


class LoraConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # name -> adapter file (diffusers' LoRA layout or one diffusers converts; stages/lora.py), checked against the
    # model at start and preloaded on every denoiser rank
    adapters: dict[str, str] = msgspec.field(default_factory=dict)
    max_loaded: int = 8  # adapters each denoiser rank keeps in memory; the least recently used unused one leaves
    # directories POST /v1/loras may load from (a path outside all of them: 403); empty: loading over HTTP is off
    allowed_roots: list[str] = msgspec.field(default_factory=list)


class VideoConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[video]``: the /v1/videos job API (runtime/video_api.py, runtime/video_jobs.py)."""

    max_frames: int = 129  # num_frames of one video at most
    max_work: int = 1 << 31  # width x height x num_frames x num_inference_steps of one video at most
    max_jobs: int = 64  # jobs kept (queued, running or finished); a new one beyond: 429 until one leaves
    job_ttl_s: float = 3600.0  # a finished job and its files are removed this long after it finished
    fps: int = 16  # frames per second of the mp4 when a request gives none (Wan's 16)
    previews: int = 0  # 0 to 3: preview decodes per job while it runs (the thumbnail variant shows the latest)


class RuntimeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: ModelConfig
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    stages: StagesConfig = msgspec.field(default_factory=StagesConfig)
    placement: PlacementConfig = msgspec.field(default_factory=PlacementConfig)
    lora: LoraConfig = msgspec.field(default_factory=LoraConfig)
    video: VideoConfig = msgspec.field(default_factory=VideoConfig)
    source: str = ""  # the file it came from ("" when built in code)


# --- the schema the checker walks: key -> (kind, allowed text) or a nested schema ---------------------------

_INT, _FLOAT, _STR, _DEVICES, _BOOL, _RESOURCES = "int", "float", "str", "devices", "bool", "resources"
_STRS, _STR_TABLE = "strs", "str_table"  # a list of strings; a table of names -> strings
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|\d+)$")

_STAGE_KEYS: dict[str, Any] = {"replicas": _INT, "max_batch_size": _INT, "batch_timeout_ms": _FLOAT,
                               "devices": _DEVICES, "threads": _INT, "ray_strategy": _STR,
                               "ray_resources": _RESOURCES}
_PIXEL_STAGE_KEYS: dict[str, Any] = {**_STAGE_KEYS, "max_batch_pixels": _INT}
_SCHEMA: dict[str, Any] = {
    "model": {"path": _STR, "dtype": _STR, "device": _STR},
    "server": {"host": _STR, "port": _INT, "api_key": _STR, "max_queue": _INT, "request_timeout_s": _FLOAT,
               "max_pixels_steps": _INT, "metrics_require_key": _BOOL, "keep_alive_timeout_s": _FLOAT,
               "header_timeout_s": _FLOAT, "body_timeout_s": _FLOAT, "max_connections": _INT,
               "stall_timeout_s": _FLOAT, "max_edit_images": _INT, "max_edit_image_bytes": _INT,
               "max_edit_image_pixels": _INT},
    "stages": {
        "text_encoder": {**_STAGE_KEYS, "parallel": dict.fromkeys(TEXT_ENCODER_PARALLEL_KEYS, _INT)},
        "denoiser": {**_PIXEL_STAGE_KEYS, "scheduling": _STR, "batch_invariant": _BOOL,
                     "priority_aging_s": _FLOAT, "mixed_sizes": _BOOL, "cpu_linear": _STR,
                     "max_padding_waste": _FLOAT, "compile": _BOOL, "compile_warmup": _STRS,
                     "cache": {"method": _STR, "threshold": _FLOAT, "fn": _INT, "bn": _INT, "warmup_steps": _INT,
                               "max_cached_steps": _INT},
                     "parallel": {**dict.fromkeys(DENOISER_PARALLEL_KEYS, _INT),
                                                        **dict.fromkeys(DENOISER_PARALLEL_CHOICES, _STR),
                                                        **dict.fromkeys(DENOISER_PARALLEL_COUNTS, _INT)}},
        "vae": {**_PIXEL_STAGE_KEYS, "tiling": _BOOL, "parallel": dict.fromkeys(VAE_PARALLEL_KEYS, _INT)},
    },
    "placement": {"tensor_transport": _STR, "launcher": _STR, "ray_address": _STR, "cpu_sharing": _STR},
    "lora": {"adapters": _STR_TABLE, "max_loaded": _INT, "allowed_roots": _STRS},
    "video": {"max_frames": _INT, "max_work": _INT, "max_jobs": _INT, "job_ttl_s": _FLOAT, "fps": _INT,
              "previews": _INT},
}
_REQUIRED = {("model",): ["path"], (): ["model"]}


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_types(raw: dict[str, Any], schema: dict[str, Any], prefix: tuple[str, ...]) -> None:
    for key in _REQUIRED.get(prefix, []):
        if key not in raw:
            where = ".".join(prefix) or "the top level"
            raise ConfigError(f"{'.'.join(prefix + (key,))}: missing; {where} requires the key {key!r}")
    for key, value in raw.items():
        path = ".".join(prefix + (key,))
        if key not in schema:
            allowed = ", ".join(sorted(schema))
            raise ConfigError(f"{path}: unknown key (value {value!r}); allowed keys here: {allowed}")
        kind = schema[key]
        if kind == _RESOURCES:  # a table of free-form names: checked here, not walked as a schema
            _check_resources(path, value)
        elif kind == _STR_TABLE:
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ConfigError(f"{path} = {_describe(value)}: must be a table of names to file paths, e.g. "
                                  f'{{style = "loras/style.safetensors"}}')
        elif kind == _STRS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path} = {_describe(value)}: must be a list of strings")
        elif isinstance(kind, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} = {_describe(value)}: must be a table [{path}]")
            _check_types(value, kind, prefix + (key,))
        elif kind == _INT:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{path} = {_describe(value)}: must be an integer")
        elif kind == _FLOAT:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{path} = {_describe(value)}: must be a finite number")
        elif kind == _BOOL:
            if not isinstance(value, bool):
                raise ConfigError(f"{path} = {_describe(value)}: must be true or false")
        elif kind == _STR:
            if not isinstance(value, str):
                raise ConfigError(f"{path} = {_describe(value)}: must be a string")
        elif kind == _BOOL:
            if not isinstance(value, bool):
                raise ConfigError(f"{path} = {_describe(value)}: must be true or false")
        elif kind == _DEVICES:
            if not isinstance(value, list) or not all(
                    isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool)) for d in value):
                raise ConfigError(f"{path} = {_describe(value)}: must be a list of device names or indices, "
                                  f'e.g. ["cuda:0", "cuda:1"] or [0, 1]')
            for i, d in enumerate(value):
                if not (isinstance(d, int) and d >= 0) and not (isinstance(d, str) and _DEVICE.match(d)):
                    raise ConfigError(f"{path}[{i}] = {_describe(d)}: allowed: 'cpu', 'cuda', 'cuda:N' or a "
                                      f"CUDA device index N >= 0")


def _check_resources(path: str, value: Any) -> None:
    """``stages.<name>.ray_resources``: Ray resource names -> amounts per rank (finite numbers > 0)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{path} = {_describe(value)}: must be a table of Ray resource names to amounts, "
                          f'e.g. {{"big_node" = 1}}')
    for name, amount in value.items():
        if not name or name in RAY_RESERVED_RESOURCES:
            raise ConfigError(f"{path}.{name} = {amount!r}: not allowed here; a rank's CPUs are its threads "
                              f"(stages.<name>.threads) and its GPU comes from model.device; allowed: custom "
                              f"resource names other than {', '.join(RAY_RESERVED_RESOURCES)}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) \
                or amount <= 0:
            raise ConfigError(f"{path}.{name} = {_describe(amount)}: must be a finite number > 0 (the amount of "
                              f"the resource each rank of the stage takes)")


def _at_least(path: str, value: float, low: float, what: str = "an integer") -> None:
    if value < low:
        raise ConfigError(f"{path} = {value!r}: must be {what} >= {low}")


def _check_parallel(raw: dict[str, Any]) -> None:
    """The ``[stages.<name>.parallel]`` tables (types already checked), before they become ``ParallelSpec``s."""
    stages = raw.get("stages", {})
    for name, keys, supported in (("text_encoder", TEXT_ENCODER_PARALLEL_KEYS, SUPPORTED_TEXT_ENCODER_DEGREES),
                                  ("denoiser", DENOISER_PARALLEL_KEYS, SUPPORTED_DENOISER_DEGREES),
                                  ("vae", VAE_PARALLEL_KEYS, SUPPORTED_VAE_DEGREES)):
        par = {k: 1 for k in keys} | stages.get(name, {}).get("parallel", {})
        base = f"stages.{name}.parallel"
        for key in keys:
            _at_least(f"{base}.{key}", par[key], 1)
        if name == "vae":
            if par["patch"] > 1 and "patch" not in supported:
                raise ConfigError(f"{base}.patch = {par['patch']}: not supported yet; this build runs the VAE "
                                  f"on one rank (set patch = 1)")
            continue
        if par["hsdp_replicate"] > 1 and par["hsdp_shard"] == 1:
            raise ConfigError(f"{base}.hsdp_replicate = {par['hsdp_replicate']} with hsdp_shard = 1: nothing would "
                              f"be sharded (every rank would hold the whole model); allowed: hsdp_shard > 1 to "
                              f"split the weights, or more copies through replicas")
        if name == "text_encoder":  # HSDP alone: the replica is hsdp_shard x hsdp_replicate ranks
            continue
        if par["tp"] > 1:
            raise ConfigError(f"{base}.tp = {par['tp']}: tensor parallelism is reserved; allowed value: 1")
        world = par["ulysses"] * par["ring"] * par["cfg"] * par["pp"] * par["dp"]
        hsdp = par["hsdp_shard"] * par["hsdp_replicate"]
        hsdp_error = hsdp_world_error(par["hsdp_shard"], par["hsdp_replicate"], world, model_degrees_text(par))
        if world > 1 and hsdp_error:  # HSDP alone (world 1) makes the replica hsdp ranks
            raise ConfigError(f"{base}.hsdp_shard = {par['hsdp_shard']} with hsdp_replicate = "
                              f"{par['hsdp_replicate']}: {hsdp_error}")
        _check_expert_parallel(base, par)
        _check_pipeline(base, par, raw.get("stages", {}).get(name, {}).get("parallel", {}))
        if par["ep"] > 1 and hsdp > 1:
            raise ConfigError(f"{base}.ep = {par['ep']} with hsdp_shard = {par['hsdp_shard']}: expert parallelism "
                              f"and HSDP sharding together are not supported yet; allowed: one of them (ep = 1 or "
                              f"hsdp_shard = 1)")
        _check_cfg_parallel(base, par)
        for key in keys:
            if key == "dp" and par["ep"] > 1:  # the EP group's data-parallel ranks: checked above
                continue
            if par[key] > 1 and key not in supported:
                hint = " (more replicas give data parallelism: set replicas instead)" if key == "dp" else ""
                raise ConfigError(f"{base}.{key} = {par[key]}: not supported yet; this build implements only "
                                  f"{', '.join(sorted(supported))} (set {key} = 1){hint}")


def _check_cfg_parallel(base: str, par: dict[str, Any]) -> None:
    """``cfg`` with the other degrees of the denoiser's table. The cfg ranks compute different rows (and a rank may
    have none in a step), so nothing that needs every rank of a group in each forward may span them."""
    if par["cfg"] == 1:
        return
    if par["hsdp_shard"] > 1:
        raise ConfigError(f"{base}.cfg = {par['cfg']} with hsdp_shard = {par['hsdp_shard']}: not supported yet; "
                          f"HSDP's weight all-gathers would span the cfg ranks, which compute different rows (a rank "
                          f"can have none in a step); allowed: one of them (cfg = 1 or hsdp_shard = 1)")
    if par["ep"] > 1:
        raise ConfigError(f"{base}.cfg = {par['cfg']} with ep = {par['ep']}: not supported yet; allowed: one of "
                          f"them (cfg = 1 or ep = 1)")


def _check_pipeline(base: str, par: dict[str, Any], given: dict[str, Any]) -> None:
    """``pp`` and its settings: the mode, the counts, and what pipeline parallelism does not combine with. (``pp``
    against the model's block count is checked where the model is read: ``check`` and the load.)"""
    mode = par.get("pp_mode", "layer")
    if mode not in PP_MODES:
        raise ConfigError(f"{base}.pp_mode = {mode!r}: allowed values are {', '.join(repr(m) for m in PP_MODES)}")
    for key in DENOISER_PARALLEL_COUNTS:
        if key in given:
            _at_least(f"{base}.{key}", given[key], 0, "an integer (0: the default)")
    if par["pp"] == 1:
        return
    for key in ("hsdp_shard", "ep"):
        if par[key] > 1:
            raise ConfigError(f"{base}.pp = {par['pp']} with {key} = {par[key]}: pipeline parallelism and "
                              f"{'HSDP sharding' if key == 'hsdp_shard' else 'expert parallelism'} together are not "
                              f"supported; allowed: one of them (pp = 1 or {key} = 1)")
    if mode == "pipefusion" and par["ulysses"] * par["ring"] > 1:
        raise ConfigError(f"{base}.pp_mode = 'pipefusion' with ulysses x ring = {par['ulysses']} x {par['ring']}: "
                          f"PipeFusion runs on pp ranks alone; allowed: ulysses = ring = 1, or pp_mode = 'layer' "
                          f"(which combines with sequence parallelism)")
    if mode == "pipefusion" and given.get("pipefusion_patches") == 1:
        raise ConfigError(f"{base}.pipefusion_patches = 1: PipeFusion needs at least 2 patches; allowed: 0 (the "
                          f"pp degree, {par['pp']}) or an integer >= 2")


def _check_expert_parallel(base: str, par: dict[str, Any]) -> None:
    """``ep`` and ``all2all_backend`` of the denoiser's table (one rule, ``ParallelSpec``'s: EP spans the
    ``tp x ulysses x ring x dp`` ranks, vLLM's data-parallel x tensor-parallel with our sequence ranks for vLLM's
    tensor ranks)."""
    backend = par.get("all2all_backend", "agrs")
    if backend not in ALL2ALL_BACKEND_NAMES:
        raise ConfigError(f"{base}.all2all_backend = {backend!r}: allowed values are "
                          f"{', '.join(repr(b) for b in ALL2ALL_BACKEND_NAMES)}")
    span = par["tp"] * par["ulysses"] * par["ring"] * par["dp"]
    if par["ep"] > 1 and par["ep"] != span:
        sp = par["ulysses"] * par["ring"]
        hint = (f"; for ep = {par['ep']} set dp = {par['ep'] // sp} (the data-parallel ranks of the expert "
                f"group run the same batch)" if par["ep"] % sp == 0 else "")
        raise ConfigError(f"{base}.ep = {par['ep']}: the expert-parallel group spans the data-parallel x "
                          f"sequence-parallel ranks, so ep must be 1 or dp x ulysses x ring = {par['dp']} x "
                          f"{par['ulysses']} x {par['ring']} = {span}{hint}")


def _check_values(cfg: RuntimeConfig) -> None:
    """The values of a typed config, table by table (the types were checked by :func:`_check_types`)."""
    _check_model_and_placement(cfg)
    _check_server(cfg.server)
    _check_stage_limits(cfg)
    _check_denoiser(cfg)
    _check_lora(cfg)
    _check_video(cfg)
    _check_vae(cfg)
    _check_devices(cfg)


def _check_model_and_placement(cfg: RuntimeConfig) -> None:
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype = {cfg.model.dtype!r}: allowed values are 'float32', 'bfloat16', 'float16'")
    if cfg.model.device not in ("cpu", "cuda"):
        raise ConfigError(f"model.device = {cfg.model.device!r}: allowed values are 'cpu', 'cuda'")
    if not cfg.model.path:
        raise ConfigError("model.path = '': must name a diffusers-format model directory")
    if cfg.placement.tensor_transport not in TENSOR_TRANSPORTS:
        raise ConfigError(f"placement.tensor_transport = {cfg.placement.tensor_transport!r}: allowed values are "
                          f"{', '.join(repr(t) for t in TENSOR_TRANSPORTS)}")
    if cfg.placement.cpu_sharing not in CPU_SHARING:
        raise ConfigError(f"placement.cpu_sharing = {cfg.placement.cpu_sharing!r}: allowed values are "
                          f"{', '.join(repr(t) for t in CPU_SHARING)}")
    _check_ray(cfg)


def _check_server(s: ServerConfig) -> None:
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"server.port = {s.port!r}: must be between 0 and 65535 (0 picks a free port)")
    _at_least("server.max_queue", s.max_queue, 1)
    _at_least("server.max_pixels_steps", s.max_pixels_steps, 0)
    _at_least("server.max_connections", s.max_connections, 1)
    for key in ("max_edit_images", "max_edit_image_bytes", "max_edit_image_pixels"):
        _at_least(f"server.{key}", getattr(s, key), 1)
    if not (s.stall_timeout_s == 0 or 0.1 <= s.stall_timeout_s <= 86400):  # also NaN and inf
        raise ConfigError(f"server.stall_timeout_s = {s.stall_timeout_s!r}: allowed values are 0 (no hang "
                          f"detection) or a number of seconds from 0.1 to 86400")
    for key in ("request_timeout_s", "keep_alive_timeout_s", "header_timeout_s", "body_timeout_s"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"server.{key} = {getattr(s, key)!r}: must be a number > 0")
    bad = next((i for i, ch in enumerate(s.api_key) if not "!" <= ch <= "~"), None)
    if bad is not None:  # it travels in an HTTP header, which carries ASCII only: it could never match
        raise ConfigError(f"server.api_key: character {bad} ({s.api_key[bad]!r}) is not allowed; allowed: "
                          f"printable ASCII without spaces ('!' to '~'), as an HTTP Authorization header "
                          f"carries it")


def _check_stage_limits(cfg: RuntimeConfig) -> None:
    """The keys every stage has (replicas, batch limits, threads)."""
    for name in STAGE_NAMES:
        st = cfg.stages.get(name)
        base = f"stages.{name}"
        _at_least(f"{base}.replicas", st.replicas, 1)
        _at_least(f"{base}.max_batch_size", st.max_batch_size, 1)
        _at_least(f"{base}.threads", st.threads, 0)
        _at_least(f"{base}.batch_timeout_ms", st.batch_timeout_ms, 0, "a number")
        _at_least(f"{base}.max_batch_pixels", st.max_batch_pixels, 0)


def _check_denoiser(cfg: RuntimeConfig) -> None:
    """``[stages.denoiser]``'s own keys, and its parallel degrees against them (cfg ranks vs. rows, all2all on CPU)."""
    den = cfg.stages.denoiser
    if den.scheduling not in SCHEDULING:
        raise ConfigError(f"stages.denoiser.scheduling = {den.scheduling!r}: allowed values are "
                          f"{', '.join(repr(s) for s in SCHEDULING)}")
    if den.cpu_linear not in CPU_LINEAR:
        raise ConfigError(f"stages.denoiser.cpu_linear = {den.cpu_linear!r}: allowed values are "
                          f"{', '.join(repr(s) for s in CPU_LINEAR)}")
    if den.priority_aging_s <= 0:
        raise ConfigError(f"stages.denoiser.priority_aging_s = {den.priority_aging_s!r}: must be a number > 0 "
                          f"(seconds of waiting that raise a request's priority by 1)")
    if not 0 <= den.max_padding_waste <= 1:
        raise ConfigError(f"stages.denoiser.max_padding_waste = {den.max_padding_waste!r}: must be a number between "
                          f"0 and 1 (the padded fraction of a step's image tokens)")
    if den.mixed_sizes:
        sp = {k: getattr(den.parallel, k) for k in ("ulysses", "ring", "pp")}
        big = {k: v for k, v in sp.items() if v > 1}
        if big:
            raise ConfigError(f"stages.denoiser.mixed_sizes = true with "
                              f"{', '.join(f'stages.denoiser.parallel.{k} = {v}' for k, v in big.items())}: not "
                              f"supported (padded rows are not split over sequence or pipeline ranks); allowed: "
                              f"mixed_sizes = false, or ulysses = ring = pp = 1 (cfg, ep, hsdp are fine)")
        if den.scheduling != "step":
            raise ConfigError(f"stages.denoiser.mixed_sizes = true with stages.denoiser.scheduling = "
                              f"{den.scheduling!r}: mixed sizes share a forward only under step-level scheduling; "
                              f"allowed: scheduling = 'step' or mixed_sizes = false")
    _check_cache(den)
    _check_compile(den)
    par = cfg.stages.denoiser.parallel
    rows = DENOISER_MAX_BRANCHES * cfg.stages.denoiser.max_batch_size
    if par.cfg > rows:
        raise ConfigError(f"stages.denoiser.parallel.cfg = {par.cfg} with stages.denoiser.max_batch_size = "
                          f"{cfg.stages.denoiser.max_batch_size}: a denoising step has at most "
                          f"{DENOISER_MAX_BRANCHES} branches (true CFG) x {cfg.stages.denoiser.max_batch_size} "
                          f"request(s) = {rows} rows, so cfg rank(s) {rows} to {par.cfg - 1} would never compute; "
                          f"allowed: cfg <= {rows} (or a larger max_batch_size)")
    if cfg.model.device == "cpu" and par.all2all_backend not in CPU_ALL2ALL_BACKEND_NAMES:  # with ep = 1 too
        raise ConfigError(f"stages.denoiser.parallel.all2all_backend = {par.all2all_backend!r}: needs CUDA GPUs "
                          f"and its kernel library, but model.device = 'cpu'; allowed on CPU: "
                          f"{', '.join(repr(b) for b in CPU_ALL2ALL_BACKEND_NAMES)}")


def _check_vae(cfg: RuntimeConfig) -> None:
    if cfg.stages.vae.tiling and cfg.stages.vae.parallel.vae_patch > 1:
        raise ConfigError(f"stages.vae.tiling = true with stages.vae.parallel.patch = "
                          f"{cfg.stages.vae.parallel.vae_patch}: tiling is the approximate single-rank memory saver, "
                          "patch parallelism the exact multi-rank one; allowed: one of them (tiling = false or "
                          "patch = 1)")


def _check_devices(cfg: RuntimeConfig) -> None:
    """Every stage's ``devices`` list: one entry per rank of every replica, CUDA only with ``model.device = 'cuda'``."""
    for name in STAGE_NAMES:
        st = cfg.stages.get(name)
        need = st.world_size * st.replicas
        if st.devices and len(st.devices) != need:
            raise ConfigError(
                f"stages.{name}.devices = {st.devices!r}: lists {len(st.devices)} devices, but {st.replicas} "
                f"replica(s) x {st.world_size} rank(s) need exactly {need} (or leave it empty)")
        if cfg.model.device == "cpu" and any(d.startswith("cuda") for d in st.devices):
            raise ConfigError(f"stages.{name}.devices = {st.devices!r}: CUDA devices with model.device = 'cpu'; "
                              f"allowed: 'cpu' entries or set model.device = 'cuda'")


_WARMUP_SIZE = re.compile(r"^[1-9][0-9]*x[1-9][0-9]*$")


def _check_compile(den: DenoiserStageConfig) -> None:
    """``compile`` / ``compile_warmup``: the warm-up sizes are "WxH"; the layouts compiled blocks cannot run are
    refused by name (``stages.compile.REFUSED_LAYOUTS``)."""
    bad = [s for s in den.compile_warmup if not _WARMUP_SIZE.match(s)]
    if bad:
        raise ConfigError(f"stages.denoiser.compile_warmup = {den.compile_warmup!r}: {bad[0]!r} is not a size; "
                          f"allowed: a list of 'WIDTHxHEIGHT' strings, e.g. [\"1024x1024\"] (or [] for no warm-up)")
    if den.compile and den.parallel.pp > 1 and den.parallel.pp_mode == "pipefusion":
        raise ConfigError(f"stages.denoiser.compile = true with {PIPEFUSION}: {REFUSED_LAYOUTS[PIPEFUSION]}; "
                          f"allowed: compile = false, or pp_mode = 'layer'")


def _check_cache(den: DenoiserStageConfig) -> None:
    """``[stages.denoiser.cache]``: the same table as a request's ``cache`` field; not under pipeline parallelism."""
    c = den.cache
    given = c.given()
    allowed = CACHE_FIELDS.get(c.method)
    if allowed is not None:
        extra = sorted(k for k in given if k not in allowed)
        if extra:
            raise ConfigError(f"stages.denoiser.cache.{extra[0]}: not a key of method {c.method!r}; allowed: "
                              f"{', '.join(allowed)}")
    try:
        parse_cache({k: v for k, v in given.items() if allowed is None or k in allowed}, "stages.denoiser.cache")
    except ValueError as e:
        raise ConfigError(f"{e}; allowed: {allowed_text()}") from None
    if c.method != "none" and den.parallel.pp > 1:
        raise ConfigError(f"stages.denoiser.cache.method = {c.method!r} with stages.denoiser.parallel.pp = "
                          f"{den.parallel.pp}: cache acceleration is not supported under pipeline parallelism (a "
                          f"stage holds only some of the blocks); allowed: method = 'none', or pp = 1")


def _check_lora(cfg: RuntimeConfig) -> None:
    """``[lora]``: adapter names, the cap (the files are checked against the model at start)."""
    from omni_runtime.runtime.requests import LORA_NAME_PATTERN

    _at_least("lora.max_loaded", cfg.lora.max_loaded, 1)
    for name, path in cfg.lora.adapters.items():
        if not re.match(LORA_NAME_PATTERN, name):
            raise ConfigError(f"lora.adapters.{name}: not an adapter name; allowed: 1 to 64 characters of A-Z, "
                              f"a-z, 0-9, '.', '_', '-' (not starting with '.', '_', '-')")
        if not path:
            raise ConfigError(f"lora.adapters.{name} = '': must name a .safetensors LoRA file")


def _check_video(cfg: RuntimeConfig) -> None:
    """``[video]``: the caps, the job store's bounds, the default fps."""
    v = cfg.video
    _at_least("video.max_frames", v.max_frames, 1)
    _at_least("video.max_work", v.max_work, 1)
    _at_least("video.max_jobs", v.max_jobs, 1)
    _at_least("video.fps", v.fps, 1)
    if not 1 <= v.fps <= 240:
        raise ConfigError(f"video.fps = {v.fps}: allowed: an integer from 1 to 240")
    if not 0 <= v.previews <= 3:
        raise ConfigError(f"video.previews = {v.previews}: allowed: an integer from 0 (off) to 3")
    if not (1.0 <= v.job_ttl_s <= 7 * 86400):  # also NaN and inf
        raise ConfigError(f"video.job_ttl_s = {v.job_ttl_s!r}: allowed: a number of seconds from 1 to 604800")


def _check_ray(cfg: RuntimeConfig) -> None:
    """``[placement] launcher / ray_address`` and every stage's ``ray_strategy``."""
    p = cfg.placement
    if p.launcher not in LAUNCHERS:
        raise ConfigError(f"placement.launcher = {p.launcher!r}: allowed values are "
                          f"{', '.join(repr(x) for x in LAUNCHERS)}")
    if p.launcher == "ray" and p.cpu_sharing == "exclusive":
        raise ConfigError("placement.cpu_sharing = 'exclusive' with placement.launcher = 'ray': the ranks of a Ray "
                          "cluster do not take turns; allowed there: 'auto', 'concurrent'")
    if p.ray_address not in ("", "auto"):
        m = _RAY_ADDRESS.match(p.ray_address)
        if m is None or not 1 <= int(m.group(3)) <= 65535:
            raise ConfigError(f"placement.ray_address = {p.ray_address!r}: allowed: '' (a private Ray instance for "
                              f"this run), 'auto' (the cluster this node joined) or 'host:port' of a Ray head "
                              f"(port 1-65535, e.g. '10.0.0.1:6379')")
    for name in STAGE_NAMES:
        st = cfg.stages.get(name)
        if st.ray_strategy not in RAY_STRATEGIES:
            raise ConfigError(f"stages.{name}.ray_strategy = {st.ray_strategy!r}: allowed values are "
                              f"{', '.join(repr(x) for x in RAY_STRATEGIES)}")
        if p.launcher == "ray" and st.devices:
            raise ConfigError(f"stages.{name}.devices = {st.devices!r} with placement.launcher = 'ray': Ray assigns "
                              f"each rank its GPU (its bundle); allowed: leave devices empty")


def config_from_dict(raw: dict[str, Any], base_dir: Path | None = None, source: str = "") -> RuntimeConfig:
    """Check ``raw`` (a parsed TOML document) and build the config; relative paths resolve against ``base_dir``."""
    _check_types(raw, _SCHEMA, ())
    _check_parallel(raw)
    raw = {**raw, "stages": {k: dict(v) for k, v in raw.get("stages", {}).items()}}
    for st in raw["stages"].values():
        if "devices" in st:  # an index N (or "N") names CUDA device N
            st["devices"] = [f"cuda:{d}" if str(d).isdigit() else d for d in st["devices"]]
    try:
        cfg = msgspec.convert(raw, RuntimeConfig, strict=False)
    except (msgspec.ValidationError, ParallelSpecError) as e:  # the walks above should catch everything
        raise ConfigError(f"invalid config: {e}") from None
    _check_values(cfg)
    path = Path(cfg.model.path).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = (base_dir / path).resolve()
    cfg.model.path = str(path)
    cfg.lora.adapters = {k: _resolve(v, base_dir) for k, v in cfg.lora.adapters.items()}
    cfg.lora.allowed_roots = [_resolve(v, base_dir) for v in cfg.lora.allowed_roots]
    cfg.source = source
    return cfg


def _resolve(path: str, base_dir: Path | None) -> str:
    p = Path(path).expanduser()
    return str((base_dir / p).resolve() if not p.is_absolute() and base_dir is not None else p)


def load_config(path: str | Path) -> RuntimeConfig:
    """Read a TOML config file; raises :class:`ConfigError` for a missing, unparsable or invalid file."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r}: cannot read it ({e.strerror})") from None
    try:
        raw = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r}: not valid TOML ({e})") from None
    return config_from_dict(raw, base_dir=p.resolve().parent, source=str(p.resolve()))
