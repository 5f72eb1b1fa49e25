"""``ParallelSpec``: every parallel degree of one stage, validated, and the rank groups they imply.

One frozen object, one name per degree: ``dp``, ``cfg``, ``pp``, ``ulysses``, ``ring``, ``tp`` (reserved: must be
1), ``hsdp_shard``, ``hsdp_replicate``, ``vae_patch`` (TOML key ``patch``) and ``ep``; plus ``all2all_backend``,
how the EP group moves MoE tokens (one of :data:`ALL2ALL_BACKEND_NAMES`, implemented in ``parallel.all2all``; it
matters only with ``ep > 1``). A TOML table ``[stages.<name>.parallel]`` converts straight into it
(``msgspec.convert``).

Rank layout (pure arithmetic, see :meth:`ParallelSpec.group_ranks`):

* model mesh, order ``tp-sp-pp-cfg-dp`` with the first dimension varying fastest::

      rank = tp_i + tp * (sp_i + sp * (pp_i + pp * (cfg_i + cfg * dp_i)))

  and inside sp, ``sp_i = ulysses_i + ulysses * ring_i`` (Ulysses fastest): Ulysses groups are contiguous ranks
  (the all-to-all runs on the nearest links) and Ring groups are strided.
* EP (vLLM's rule): the experts of one model replica are spread over the ranks that hold the same pipeline stage
  and CFG branch, i.e. an EP group spans ``tp × ulysses × ring × dp`` ranks (vLLM: ``dp × tp``; our sequence
  ranks play the role of vLLM's tensor ranks). ``ep`` is 1 (no expert parallelism: every rank its own group) or
  exactly that product. Ranks of one EP group with the same ``tp × sp`` index (different ``dp`` index) run the
  same batch, so they hold identical tokens: :meth:`ParallelSpec.ep_replica_groups`.
* HSDP mesh, over the same ranks: ``rank = shard_i + hsdp_shard * replicate_i``; shard groups are contiguous,
  replicate groups strided. ``hsdp_shard × hsdp_replicate`` equals the world size, or both are 1 (disabled:
  every rank is its own shard and replicate group).
* VAE patch groups are contiguous blocks of ``vae_patch`` ranks; ``vae_patch`` must divide the world size.
* World size: the model mesh's ranks. A stage with no model degree (every rank runs the whole batch: the VAE
  stage, or HSDP alone on a denoiser or the text encoder) has as many ranks as its weight/patch degrees span,
  ``max(vae_patch, hsdp_shard × hsdp_replicate)`` (the rules above then say which combinations fit).

Every error is a :class:`ParallelSpecError` whose message prints the arithmetic.
"""

from __future__ import annotations

import itertools
import logging

import msgspec

logger = logging.getLogger(__name__)

# Model mesh dimensions, fastest-varying first.
MESH_DIMS: tuple[str, ...] = ("tp", "ulysses", "ring", "pp", "cfg", "dp")

# Which model-mesh dimensions each named group spans.
GROUP_DIMS: dict[str, tuple[str, ...]] = {
    "world": MESH_DIMS,
    "tp": ("tp",),
    "sp": ("ulysses", "ring"),
    "ulysses": ("ulysses",),
    "ring": ("ring",),
    "pp": ("pp",),
    "cfg": ("cfg",),
    "dp": ("dp",),
    "ep": ("tp", "ulysses", "ring", "dp"),
}

#: Every group name a :class:`ParallelSpec` (and a ``Mesh``) knows, in creation order (identical on all ranks).
GROUP_NAMES: tuple[str, ...] = (*GROUP_DIMS, "hsdp_shard", "hsdp_replicate", "vae_patch")

DEGREES: tuple[str, ...] = ("dp", "cfg", "pp", "ulysses", "ring", "tp", "hsdp_shard", "hsdp_replicate",
                            "vae_patch", "ep")

#: ``all2all_backend`` values: the keys of ``parallel.all2all.ALL2ALL_BACKENDS`` (tests/test_ep_config.py asserts
#: they agree; kept here so that a spec validates without importing torch). The first three run on any device.
ALL2ALL_BACKEND_NAMES: tuple[str, ...] = ("naive", "agrs", "alltoallv", "deepep_high_throughput", "deepep_low_latency")
CPU_ALL2ALL_BACKEND_NAMES: tuple[str, ...] = ("naive", "agrs", "alltoallv")

#: ``pp_mode`` values: layer pipeline parallelism (exact) or PipeFusion (stale K/V, approximate).
PP_MODES: tuple[str, ...] = ("layer", "pipefusion")
#: the pipeline's count settings (0 means the default), integers >= 0
PP_COUNTS: tuple[str, ...] = ("pp_microbatches", "pipefusion_patches", "pipefusion_warmup")


class ParallelSpecError(ValueError):
    """A parallel degree is invalid or the degrees do not fit together; the message shows the arithmetic."""


def hsdp_world_error(shard: int, replicate: int, world: int, world_text: str = "") -> str | None:
    """The HSDP world-size rule, in one place for the config, :class:`ParallelSpec` and ``parallel.hsdp``: HSDP
    shards the weights over the stage's own ranks, so ``hsdp_shard × hsdp_replicate`` equals the world size (or is
    1: HSDP off). Returns the one message (``world_text``: how the world size is made up), or None if it holds."""
    hsdp = shard * replicate
    if hsdp in (1, world):
        return None
    return (f"hsdp_shard {shard} × hsdp_replicate {replicate} = {hsdp} does not equal the world size "
            f"{world_text + ' = ' if world_text else ''}{world} (set both to 1 to disable HSDP)")


def model_degrees_text(degrees: dict[str, int]) -> str:
    """``tp 1 × ulysses 2 × ring 1 × pp 1 × cfg 1 × dp 1``: how a stage's model mesh size is made up."""
    return " × ".join(f"{d} {degrees.get(d, 1)}" for d in MESH_DIMS)


def _mesh_groups(sizes: dict[str, int], members: tuple[str, ...]) -> list[list[int]]:
    """All groups of ranks that vary only along ``members`` (the other dimensions fixed).

    ``sizes`` maps each dimension to its degree, fastest-varying first. Ranks inside a group ascend (a rank's
    index is its rank in the group); groups are ordered by their first rank.
    """
    names = list(sizes)
    strides: dict[str, int] = {}
    stride = 1
    for name in names:
        strides[name] = stride
        stride *= sizes[name]
    member_dims = [n for n in names if n in members]
    other_dims = [n for n in names if n not in members]

    def offsets(dims: list[str]) -> list[int]:
        ranges = [range(sizes[d]) for d in reversed(dims)]  # slowest outermost: ascending offsets
        return [sum(i * strides[d] for i, d in zip(idx, reversed(dims), strict=True))
                for idx in itertools.product(*ranges)]

    groups = [[base + off for off in offsets(member_dims)] for base in offsets(other_dims)]
    return sorted(groups, key=lambda g: g[0])


class ParallelSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every parallel degree of one stage; construction validates them (:class:`ParallelSpecError`)."""

    dp: int = 1
    cfg: int = 1
    pp: int = 1
    ulysses: int = 1
    ring: int = 1
    tp: int = 1
    hsdp_shard: int = 1
    hsdp_replicate: int = 1
    vae_patch: int = msgspec.field(default=1, name="patch")
    ep: int = 1
    all2all_backend: str = "agrs"  # not a degree: how the EP group exchanges MoE tokens (ep > 1)
    # Not degrees: how pp > 1 runs (``parallel.strategies.pipeline_parallel``). ``pp_mode``: one of PP_MODES.
    pp_mode: str = "layer"
    pp_microbatches: int = 0  # layer PP: micro-batches per step (0: one per row)
    pipefusion_patches: int = 0  # PipeFusion: image-token patches (0: the pp degree)
    pipefusion_warmup: int = 1  # PipeFusion: first steps run synchronously (exact) before stale K/V is used
    # Not a degree: with hsdp_shard > 1 and CPU weights, hand the freed all-gathered weights' heap pages back to the OS
    # after each forward (``parallel.hsdp_release``: lower steady-state memory, slower steps)
    hsdp_release_memory: bool = True

    def __post_init__(self) -> None:
        for name in DEGREES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParallelSpecError(f"{name} must be a positive integer, got {value!r}")
        if self.all2all_backend not in ALL2ALL_BACKEND_NAMES:
            raise ParallelSpecError(f"all2all_backend {self.all2all_backend!r} is not known; allowed: "
                                    f"{', '.join(ALL2ALL_BACKEND_NAMES)}")
        if self.tp != 1:
            raise ParallelSpecError(f"tp = {self.tp}: tensor parallelism is reserved; tp must be 1")
        if self.pp_mode not in PP_MODES:
            raise ParallelSpecError(f"pp_mode {self.pp_mode!r} is not known; allowed: {', '.join(PP_MODES)}")
        if not isinstance(self.hsdp_release_memory, bool):
            raise ParallelSpecError(f"hsdp_release_memory must be true or false, got {self.hsdp_release_memory!r}")
        for name in PP_COUNTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ParallelSpecError(f"{name} must be an integer >= 0 (0: the default), got {value!r}")
        world = self.world_size
        if world % self.vae_patch:
            raise ParallelSpecError(f"vae_patch {self.vae_patch} does not divide the world size "
                                    f"{self._product_text()} = {world}")
        hsdp_error = hsdp_world_error(self.hsdp_shard, self.hsdp_replicate, world, self._product_text())
        if hsdp_error:
            raise ParallelSpecError(hsdp_error)
        ep_span = self.tp * self.ulysses * self.ring * self.dp
        if self.ep not in (1, ep_span):
            raise ParallelSpecError(
                f"ep {self.ep} must be 1 or equal the ranks an expert group spans, tp {self.tp} × ulysses "
                f"{self.ulysses} × ring {self.ring} × dp {self.dp} = {ep_span}")

    # ------------------------------------------------------------------ sizes
    @property
    def sp(self) -> int:
        """Sequence-parallel size: ``ulysses × ring``."""
        return self.ulysses * self.ring

    @property
    def model_size(self) -> int:
        """Ranks of the model mesh: ``tp × ulysses × ring × pp × cfg × dp``."""
        return self.tp * self.sp * self.pp * self.cfg * self.dp

    @property
    def world_size(self) -> int:
        """Ranks of the stage: the model mesh, or for a stage with no model degree the ranks its other degrees
        span, ``max(vae_patch, hsdp_shard × hsdp_replicate)``: these ranks cooperate on every batch."""
        if self.model_size > 1:
            return self.model_size
        return max(self.vae_patch, self.hsdp_shard * self.hsdp_replicate)

    def _product_text(self) -> str:
        if self.model_size == 1 and self.world_size > 1:
            return (f"max(vae_patch {self.vae_patch}, hsdp_shard {self.hsdp_shard} × hsdp_replicate "
                    f"{self.hsdp_replicate}) (no model degree)")
        return model_degrees_text({d: getattr(self, d) for d in MESH_DIMS})

    def check_world_size(self, world_size: int) -> None:
        """Raise unless the stage's process count equals :attr:`world_size` (the message shows the product)."""
        if world_size != self.world_size:
            raise ParallelSpecError(f"{self._product_text()} = {self.world_size} does not equal the world size "
                                    f"{world_size}")

    # ------------------------------------------------------------------ groups
    def group_ranks(self) -> dict[str, list[list[int]]]:
        """Every group of every kind, as global ranks: ``{name: [[ranks of group 0], ...]}`` for every name of
        :data:`GROUP_NAMES`. Pure (no processes). Within a group, a rank's index is its rank in the group."""
        world = self.world_size
        if self.model_size > 1:
            sizes = {"tp": self.tp, "ulysses": self.ulysses, "ring": self.ring, "pp": self.pp, "cfg": self.cfg,
                     "dp": self.dp}
        else:  # no model degree (VAE patch, HSDP alone): every model dimension is 1, the ranks cooperate
            sizes = {"tp": 1, "ulysses": 1, "ring": 1, "pp": 1, "cfg": 1, "dp": world}
        groups = {name: _mesh_groups(sizes, dims) for name, dims in GROUP_DIMS.items()}
        if self.model_size == 1:
            groups["dp"] = [[r] for r in range(world)]  # the ranks cooperate; they are not replicas
            groups["ep"] = [[r] for r in range(world)]
        if self.ep == 1:
            groups["ep"] = [[r] for r in range(world)]
        if self.hsdp_shard * self.hsdp_replicate > 1:
            hsdp = {"shard": self.hsdp_shard, "replicate": self.hsdp_replicate}
            groups["hsdp_shard"] = _mesh_groups(hsdp, ("shard",))
            groups["hsdp_replicate"] = _mesh_groups(hsdp, ("replicate",))
        else:
            groups["hsdp_shard"] = [[r] for r in range(world)]
            groups["hsdp_replicate"] = [[r] for r in range(world)]
        groups["vae_patch"] = [list(range(s, s + self.vae_patch)) for s in range(0, world, self.vae_patch)]
        return groups

    def ep_replica_groups(self) -> list[list[int]]:
        """Indices *within an EP group* of the ranks that hold identical tokens: those with the same ``tp × sp``
        index (an EP group's index is ``tp_i + tp × (sp_i + sp × dp_i)``), i.e. the data-parallel ranks, which run
        the same batch. The all2all manager splits such tokens among them (``is_sequence_parallel=False``)."""
        span = self.tp * self.sp
        return [[i for i in range(self.ep) if i % span == s] for s in range(min(span, self.ep))]

    def groups_of(self, rank: int) -> dict[str, list[int]]:
        """The group of each kind that global ``rank`` belongs to (``{name: ranks}``, :data:`GROUP_NAMES` order)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ParallelSpecError(f"rank {rank!r} is not a rank of a world of {self.world_size}")
        return {name: next(g for g in groups if rank in g) for name, groups in self.group_ranks().items()}

    def describe(self) -> str:
        """The non-trivial degrees, e.g. ``ulysses 2 × ring 2`` (``single`` when all are 1)."""
        parts = [f"{n} {getattr(self, n)}" for n in DEGREES if getattr(self, n) != 1]
        if self.ep > 1:
            parts[-1] += f" ({self.all2all_backend})"
        if self.pp > 1:
            i = next(i for i, p in enumerate(parts) if p.startswith("pp "))
            parts[i] += (f" (layer, micro-batches: {self.pp_microbatches or 'one per row'})" if self.pp_mode == "layer"
                         else f" (pipefusion, {self.pipefusion_patches or self.pp} patches, "
                              f"{self.pipefusion_warmup} warm-up steps)")
        return " × ".join(parts) or "single"
