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

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

STAGE_NAMES = ("text_encoder", "denoiser", "vae")

# Degrees whose implementation exists in ``parallel``/``stages`` and is wired into the stage processes.
# Anything else > 1 is rejected with "not supported yet" instead of silently running unsharded.
SUPPORTED_DENOISER_DEGREES = frozenset({"ulysses", "ring", "hsdp_shard", "hsdp_replicate"})
SUPPORTED_VAE_DEGREES: frozenset[str] = frozenset()


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


class DenoiserParallelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    pp: int = 1
    hsdp_shard: int = 1
    hsdp_replicate: int = 1

    @property
    def model_size(self) -> int:
        """``ulysses × ring × cfg × pp``: the ranks the computation is split over."""
        return self.ulysses * self.ring * self.cfg * self.pp

    @property
    def hsdp_size(self) -> int:
        return self.hsdp_shard * self.hsdp_replicate

    @property
    def world_size(self) -> int:
        """Ranks in one denoiser replica: the product of the mesh degrees, HSDP sharding the weights across the
        same ranks; with no other degree > 1, ``hsdp_shard × hsdp_replicate`` ranks (every rank runs the batch)."""
        return self.model_size if self.model_size > 1 else self.hsdp_size


class TextEncoderParallelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    hsdp_shard: int = 1
    hsdp_replicate: int = 1

    @property
    def world_size(self) -> int:
        """Ranks in one text encoder replica: each rank holds 1/hsdp_shard of the encoders' weights."""
        return self.hsdp_shard * self.hsdp_replicate


class VaeParallelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    patch: int = 1

    @property
    def world_size(self) -> int:
        return self.patch


class StageConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    replicas: int = 1
    max_batch_size: int = 8
    batch_timeout_ms: float = 5.0
    devices: list[str] = msgspec.field(default_factory=list)
    threads: int = 0  # torch threads per rank; 0 = auto (the stage's ranks split the cores)

    @property
    def world_size(self) -> int:
        return 1


class TextEncoderStageConfig(StageConfig, kw_only=True):
    parallel: TextEncoderParallelConfig = msgspec.field(default_factory=TextEncoderParallelConfig)

    @property
    def world_size(self) -> int:
        return self.parallel.world_size


class DenoiserStageConfig(StageConfig, kw_only=True):
    parallel: DenoiserParallelConfig = msgspec.field(default_factory=DenoiserParallelConfig)

    @property
    def world_size(self) -> int:
        return self.parallel.world_size


class VaeStageConfig(StageConfig, kw_only=True):
    parallel: VaeParallelConfig = msgspec.field(default_factory=VaeParallelConfig)

    @property
    def world_size(self) -> int:
        return self.parallel.world_size


class StagesConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    text_encoder: TextEncoderStageConfig = msgspec.field(default_factory=TextEncoderStageConfig)
    denoiser: DenoiserStageConfig = msgspec.field(default_factory=DenoiserStageConfig)
    vae: VaeStageConfig = msgspec.field(default_factory=VaeStageConfig)

    def get(self, name: str) -> StageConfig:
        return getattr(self, name)


class RuntimeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: ModelConfig
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    stages: StagesConfig = msgspec.field(default_factory=StagesConfig)
    source: str = ""  # the file it came from ("" when built in code)


# --- the schema the checker walks: key -> (kind, allowed text) or a nested schema ---------------------------

_INT, _FLOAT, _STR, _DEVICES = "int", "float", "str", "devices"
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|\d+)$")

_STAGE_KEYS: dict[str, Any] = {"replicas": _INT, "max_batch_size": _INT, "batch_timeout_ms": _FLOAT,
                               "devices": _DEVICES, "threads": _INT}
_SCHEMA: dict[str, Any] = {
    "model": {"path": _STR, "dtype": _STR, "device": _STR},
    "server": {"host": _STR, "port": _INT, "api_key": _STR, "max_queue": _INT, "request_timeout_s": _FLOAT},
    "stages": {
        "text_encoder": {**_STAGE_KEYS,
                         "parallel": dict.fromkeys(TextEncoderParallelConfig.__struct_fields__, _INT)},
        "denoiser": {**_STAGE_KEYS, "parallel": dict.fromkeys(DenoiserParallelConfig.__struct_fields__, _INT)},
        "vae": {**_STAGE_KEYS, "parallel": {"patch": _INT}},
    },
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
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} = {_describe(value)}: must be a table [{path}]")
            _check_types(value, kind, prefix + (key,))
        elif kind == _INT:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{path} = {_describe(value)}: must be an integer")
        elif kind == _FLOAT:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{path} = {_describe(value)}: must be a finite number")
        elif kind == _STR:
            if not isinstance(value, str):
                raise ConfigError(f"{path} = {_describe(value)}: must be a string")
        elif kind == _DEVICES:
            if not isinstance(value, list) or not all(
                    isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool)) for d in value):
                raise ConfigError(f"{path} = {_describe(value)}: must be a list of device names or indices, "
                                  f'e.g. ["cuda:0", "cuda:1"] or [0, 1]')
            for i, d in enumerate(value):
                if not (isinstance(d, int) and d >= 0) and not (isinstance(d, str) and _DEVICE.match(d)):
                    raise ConfigError(f"{path}[{i}] = {_describe(d)}: allowed: 'cpu', 'cuda', 'cuda:N' or a "
                                      f"CUDA device index N >= 0")


def _at_least(path: str, value: float, low: float, what: str = "an integer") -> None:
    if value < low:
        raise ConfigError(f"{path} = {value!r}: must be {what} >= {low}")


def _check_values(cfg: RuntimeConfig) -> None:
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype = {cfg.model.dtype!r}: allowed values are 'float32', 'bfloat16', 'float16'")
    if cfg.model.device not in ("cpu", "cuda"):
        raise ConfigError(f"model.device = {cfg.model.device!r}: allowed values are 'cpu', 'cuda'")
    if not cfg.model.path:
        raise ConfigError("model.path = '': must name a diffusers-format model directory")
    s = cfg.server
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"server.port = {s.port!r}: must be between 0 and 65535 (0 picks a free port)")
    _at_least("server.max_queue", s.max_queue, 1)
    if s.request_timeout_s <= 0:
        raise ConfigError(f"server.request_timeout_s = {s.request_timeout_s!r}: must be a number > 0")
    for name in STAGE_NAMES:
        st = cfg.stages.get(name)
        base = f"stages.{name}"
        _at_least(f"{base}.replicas", st.replicas, 1)
        _at_least(f"{base}.max_batch_size", st.max_batch_size, 1)
        _at_least(f"{base}.threads", st.threads, 0)
        _at_least(f"{base}.batch_timeout_ms", st.batch_timeout_ms, 0, "a number")
    par = cfg.stages.denoiser.parallel
    for key in DenoiserParallelConfig.__struct_fields__:
        _at_least(f"stages.denoiser.parallel.{key}", getattr(par, key), 1)
    _at_least("stages.vae.parallel.patch", cfg.stages.vae.parallel.patch, 1)
    hsdp = par.hsdp_size
    if hsdp > 1 and par.model_size > 1 and hsdp != par.model_size:
        raise ConfigError(
            f"stages.denoiser.parallel.hsdp_shard = {par.hsdp_shard} with hsdp_replicate = {par.hsdp_replicate}: "
            f"hsdp_shard x hsdp_replicate = {hsdp} must equal the denoiser world size "
            f"ulysses x ring x cfg x pp = {par.ulysses} x {par.ring} x {par.cfg} x {par.pp} = {par.model_size} "
            f"(HSDP shards the weights across the same ranks; or set the other degrees to 1)")
    te = cfg.stages.text_encoder.parallel
    for key in TextEncoderParallelConfig.__struct_fields__:
        _at_least(f"stages.text_encoder.parallel.{key}", getattr(te, key), 1)
    if par.cfg > 2:
        raise ConfigError(f"stages.denoiser.parallel.cfg = {par.cfg}: CFG parallelism splits the conditional "
                          f"and unconditional branch, allowed values are 1 or 2")
    for key in DenoiserParallelConfig.__struct_fields__:
        value = getattr(par, key)
        if value > 1 and key not in SUPPORTED_DENOISER_DEGREES:
            raise ConfigError(f"stages.denoiser.parallel.{key} = {value}: not supported yet; this build "
                              f"implements only {', '.join(sorted(SUPPORTED_DENOISER_DEGREES))} (set {key} = 1)")
    if cfg.stages.vae.parallel.patch > 1 and "patch" not in SUPPORTED_VAE_DEGREES:
        raise ConfigError(f"stages.vae.parallel.patch = {cfg.stages.vae.parallel.patch}: not supported yet; "
                          f"this build runs the VAE on one rank (set patch = 1)")
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


def config_from_dict(raw: dict[str, Any], base_dir: Path | None = None, source: str = "") -> RuntimeConfig:
    """Check ``raw`` (a parsed TOML document) and build the config; relative paths resolve against ``base_dir``."""
    _check_types(raw, _SCHEMA, ())
    raw = {**raw, "stages": {k: dict(v) for k, v in raw.get("stages", {}).items()}}
    for st in raw["stages"].values():
        if "devices" in st:  # an index N (or "N") names CUDA device N
            st["devices"] = [f"cuda:{d}" if str(d).isdigit() else d for d in st["devices"]]
    try:
        cfg = msgspec.convert(raw, RuntimeConfig, strict=False)
    except msgspec.ValidationError as e:  # the walk above should have caught everything; keep the message
        raise ConfigError(f"invalid config: {e}") from None
    _check_values(cfg)
    path = Path(cfg.model.path).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = (base_dir / path).resolve()
    cfg.model.path = str(path)
    cfg.source = source
    return cfg


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
