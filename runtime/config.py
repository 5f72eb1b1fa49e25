"""What a runtime config holds: one msgspec Struct per TOML table, the allowed values of its choice keys, and the
one :class:`ConfigError` every mistake in a config file raises.

Reading and checking a file is ``runtime/config_load.py`` (the key types: ``config_schema.py``; the parallel tables:
``config_parallel.py``; the values: ``config_values.py``). Every mistake a user can make in a config file (an
unknown key, a value of the wrong type, an impossible or not-yet-supported parallel degree) raises one
:class:`ConfigError` whose message names the key path, the value and what is allowed, e.g.
``stages.denoiser.parallel.ulysses = 0: must be an integer >= 1``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from omni_runtime.parallel.parallel_spec import ParallelSpec
from omni_runtime.stages.cache_config import CACHE_FIELDS, CacheConfig, parse_cache

STAGE_NAMES = ("text_encoder", "denoiser", "vae")
PIXEL_STAGES = ("denoiser", "vae")  # the stages whose batches have a max_batch_pixels cap
DEFAULT_MAX_PIXELS_STEPS = 1 << 26  # [server] max_pixels_steps
DEFAULT_MAX_BATCH_PIXELS = 1 << 22  # [stages.denoiser|vae] max_batch_pixels: one 2048x2048, 64 x 256x256


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
