"""The values of a typed config, table by table: ranges, allowed choices, and the keys that do not combine (the
types were checked by ``runtime/config_schema.py``, the parallel tables by ``runtime/config_parallel.py``)."""

from __future__ import annotations

import re

from omni_runtime.parallel.parallel_spec import CPU_ALL2ALL_BACKEND_NAMES
from omni_runtime.runtime.config import (
    CPU_SHARING,
    LAUNCHERS,
    RAY_STRATEGIES,
    SCHEDULING,
    STAGE_NAMES,
    TENSOR_TRANSPORTS,
    ConfigError,
    DenoiserStageConfig,
    RuntimeConfig,
    ServerConfig,
)
from omni_runtime.stages.cache_config import CACHE_FIELDS, allowed_text, parse_cache
from omni_runtime.stages.compile import PIPEFUSION, REFUSED_LAYOUTS
from omni_runtime.stages.cpu_linear import CPU_LINEAR

# Branches a Flux request runs per denoising step at most (true CFG: conditional + unconditional); with
# ``max_batch_size`` requests a step has at most this many rows per request to spread over the cfg ranks.
DENOISER_MAX_BRANCHES = 2
_RAY_ADDRESS = re.compile(r"^(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def at_least(path: str, value: float, low: float, what: str = "an integer") -> None:
    """``path = value: must be <what> >= low`` unless ``value >= low``."""
    if value < low:
        raise ConfigError(f"{path} = {value!r}: must be {what} >= {low}")


def check_values(cfg: RuntimeConfig) -> None:
    """The values of a typed config, table by table (the types were checked by ``config_schema.check_types``)."""
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
    at_least("server.max_queue", s.max_queue, 1)
    at_least("server.max_pixels_steps", s.max_pixels_steps, 0)
    at_least("server.max_connections", s.max_connections, 1)
    for key in ("max_edit_images", "max_edit_image_bytes", "max_edit_image_pixels"):
        at_least(f"server.{key}", getattr(s, key), 1)
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
        at_least(f"{base}.replicas", st.replicas, 1)
        at_least(f"{base}.max_batch_size", st.max_batch_size, 1)
        at_least(f"{base}.threads", st.threads, 0)
        at_least(f"{base}.batch_timeout_ms", st.batch_timeout_ms, 0, "a number")
        at_least(f"{base}.max_batch_pixels", st.max_batch_pixels, 0)


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
    if c.method == "teacache" and den.parallel.hsdp_shard > 1:  # the edge refuses such a request too
        raise ConfigError(f"stages.denoiser.cache.method = 'teacache' with stages.denoiser.parallel.hsdp_shard = "
                          f"{den.parallel.hsdp_shard}: TeaCache is not supported with HSDP (the first block's "
                          f"modulation weights are sharded outside its forward); allowed: method = 'first_block', "
                          f"'dbcache' or 'none', or hsdp_shard = 1")


def _check_lora(cfg: RuntimeConfig) -> None:
    """``[lora]``: adapter names, the cap (the files are checked against the model at start)."""
    from omni_runtime.runtime.requests import LORA_NAME_PATTERN

    at_least("lora.max_loaded", cfg.lora.max_loaded, 1)
    for name, path in cfg.lora.adapters.items():
        if not re.match(LORA_NAME_PATTERN, name):
            raise ConfigError(f"lora.adapters.{name}: not an adapter name; allowed: 1 to 64 characters of A-Z, "
                              f"a-z, 0-9, '.', '_', '-' (not starting with '.', '_', '-')")
        if not path:
            raise ConfigError(f"lora.adapters.{name} = '': must name a .safetensors LoRA file")


def _check_video(cfg: RuntimeConfig) -> None:
    """``[video]``: the caps, the job store's bounds, the default fps."""
    v = cfg.video
    at_least("video.max_frames", v.max_frames, 1)
    at_least("video.max_work", v.max_work, 1)
    at_least("video.max_jobs", v.max_jobs, 1)
    at_least("video.fps", v.fps, 1)
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
