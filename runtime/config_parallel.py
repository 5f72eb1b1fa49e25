"""The ``[stages.<name>.parallel]`` tables of a config: which degrees each stage has, which are implemented, and
which combine, checked on the raw tables before they become ``ParallelSpec``s."""

from __future__ import annotations

from typing import Any

from omni_runtime.parallel.parallel_spec import (
    ALL2ALL_BACKEND_NAMES,
    PP_MODES,
    hsdp_world_error,
    model_degrees_text,
)
from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_values import at_least

# The parallel keys of each stage's ``[stages.<name>.parallel]`` table (they parse straight into
# ``parallel.parallel_spec.ParallelSpec``; the VAE's ``patch`` is the spec's ``vae_patch``).
DENOISER_PARALLEL_KEYS = ("ulysses", "ring", "cfg", "pp", "dp", "tp", "hsdp_shard", "hsdp_replicate", "ep")
# ... and the one key of the denoiser's table that is not a degree: how the expert-parallel group moves MoE tokens
# (``ParallelSpec.all2all_backend``, one of ``ALL2ALL_BACKEND_NAMES``)
DENOISER_PARALLEL_CHOICES = ("all2all_backend", "pp_mode")
# ... and its pipeline counts (integers >= 0, 0 = the default; ``ParallelSpec.pp_microbatches`` etc.)
DENOISER_PARALLEL_COUNTS = ("pp_microbatches", "pipefusion_patches", "pipefusion_warmup")
# ... and its switches (true / false; ``ParallelSpec.hsdp_release_memory``: the heap release after each HSDP forward)
DENOISER_PARALLEL_FLAGS = ("hsdp_release_memory",)
VAE_PARALLEL_KEYS = ("patch",)
TEXT_ENCODER_PARALLEL_KEYS = ("hsdp_shard", "hsdp_replicate")
# Degrees whose implementation exists in ``parallel``/``stages`` and is wired into the stage processes.
# Anything else > 1 is rejected with "not supported yet" instead of silently running unsharded.
# ``dp`` > 1 only together with ``ep`` (the EP group's data-parallel ranks, see ``_check_expert_parallel``).
SUPPORTED_DENOISER_DEGREES = frozenset({"ulysses", "ring", "cfg", "pp", "ep", "hsdp_shard", "hsdp_replicate"})
SUPPORTED_TEXT_ENCODER_DEGREES = frozenset(TEXT_ENCODER_PARALLEL_KEYS)
SUPPORTED_VAE_DEGREES: frozenset[str] = frozenset({"patch"})


def check_parallel(raw: dict[str, Any]) -> None:
    """The ``[stages.<name>.parallel]`` tables (types already checked), before they become ``ParallelSpec``s."""
    stages = raw.get("stages", {})
    for name, keys, supported in (("text_encoder", TEXT_ENCODER_PARALLEL_KEYS, SUPPORTED_TEXT_ENCODER_DEGREES),
                                  ("denoiser", DENOISER_PARALLEL_KEYS, SUPPORTED_DENOISER_DEGREES),
                                  ("vae", VAE_PARALLEL_KEYS, SUPPORTED_VAE_DEGREES)):
        par = {k: 1 for k in keys} | stages.get(name, {}).get("parallel", {})
        base = f"stages.{name}.parallel"
        for key in keys:
            at_least(f"{base}.{key}", par[key], 1)
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
            at_least(f"{base}.{key}", given[key], 0, "an integer (0: the default)")
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
