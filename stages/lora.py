"""Per-request LoRA on the denoiser: unmerged, per row, batched by adapter (issue 25).

**The math.** peft's LoRA linear (what diffusers' ``load_lora_weights`` + ``set_adapters(names, weights)``
installs) computes ``y = W x + b + sum_a w_a * (alpha_a / r_a) * B_a(A_a(x))`` over the active adapters ``a``.
Here the base weights are never touched: a forward hook on each targeted ``nn.Linear`` adds, for each adapter
used in the current forward, ``scale_r * B_a(A_a(x_r))`` to the rows ``r`` that use it, where ``scale_r`` is the
row's request weight times ``alpha / r`` of that layer. The rows of one adapter are gathered and go through one
pair of matmuls (a segmented matmul: one per adapter, not one per row or request); rows with no adapter cost
nothing. The hook runs after the layer's own ``forward`` (torch's, or oneDNN's from ``stages.cpu_linear``, or an
HSDP-sharded one), so it composes with all of them; ``cpu_linear.linear_gelu_tanh`` leaves its fused GELU path
for a layer whose LoRA is active in the current forward.

**How rows carry adapters.** The running set (``stages.step_batch``) passes two extra model arguments:
``lora_scales``, a *row* argument ``(rows, K)`` (row ``r``'s weight of the step's ``K`` adapters, 0 when unused),
and ``lora_adapters``, a shared argument (the ``K`` :class:`LoraAdapter` objects). Row strategies split row
arguments with the rows (CFG parallel, the micro-batches of pipeline parallel); a forward pre-hook on the model
takes both out of the keyword arguments and makes them the current forward's LoRA (:class:`LoraBank`), a forward
hook clears it. Sequence parallel needs nothing: LoRA is per token.

**Files** (diffusers' LoRA layout, other layouts converted by the pipeline class's own ``lora_state_dict``):
``stages.lora_files``.

**Where adapters live.** Every denoiser rank holds its own :class:`LoraBank`: the config's adapters
(``[lora] adapters``, :func:`configured_specs`) load at start (:meth:`LoraBank.preload`, at most ``max_loaded``),
others from their file on the first admit that names them (every rank admits the same items at the same step
boundary, so all ranks load alike), at most ``max_loaded`` stay cached: the least recently used one that no
running request uses leaves first (an adapter in use is pinned; while more than ``max_loaded`` are in use, more
stay until their requests leave). Under pipeline parallelism a rank keeps only the layers it holds; under HSDP the adapter
weights are replicated (not sharded) on every rank.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_runtime.stages.lora_files import LoraError, check_layer, parse_lora, read_lora_file

logger = logging.getLogger(__name__)

__all__ = ["LoraAdapter", "LoraBank", "LoraSpec", "configured_specs"]

#: model keyword arguments the running set passes (taken out by :class:`LoraBank`'s pre-hook)
ROW_ARG, SHARED_ARG = "lora_scales", "lora_adapters"
_MARK = "_omni_lora"


@dataclass(frozen=True)
class LoraSpec:
    """One adapter of a request: its registered ``name``, file ``path``, registry ``version`` (a re-registered name
    is another adapter) and the request's ``scale`` (diffusers' ``set_adapters`` weight)."""

    name: str
    path: str
    version: int = 0
    scale: float = 1.0

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.name, self.path, self.version)


@dataclass
class LoraLayer:
    """The LoRA of one linear layer: ``A`` (r, in), ``B`` (out, r) and ``alpha / r``."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float


@dataclass(eq=False)
class LoraAdapter:
    """A loaded adapter: module name -> :class:`LoraLayer` (only the layers this rank holds)."""

    name: str
    key: tuple[str, str, int]
    layers: dict[str, LoraLayer] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(x.A.numel() * x.A.element_size() + x.B.numel() * x.B.element_size() for x in self.layers.values())


def configured_specs(adapters: Mapping[str, str]) -> list[LoraSpec]:
    """The specs of ``[lora] adapters`` as the server's registry registers them at start (versions 1, 2, ... in
    config order, before any other): what the denoiser ranks preload, so a request's adapter is already cached."""
    return [LoraSpec(name, str(path), version) for version, (name, path) in enumerate(adapters.items(), 1)]


# --- the bank: adapters of one rank and the hooks ---------------------------------------------------------------


@dataclass
class _Current:
    """The LoRA of the forward in progress: per adapter, its rows (None: every row) and their weights."""

    adapters: list[LoraAdapter]
    rows: list[tuple[slice | torch.Tensor | None, torch.Tensor]]
    n: int


class LoraBank:
    """The adapters of one denoiser rank and the hooks that apply them to ``model``'s linear layers."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device, max_loaded: int = 8,
                 pipeline: str | None = None) -> None:
        """``pipeline``: the diffusers pipeline class whose ``lora_state_dict`` converts other layouts (None:
        diffusers' layout only)."""
        if max_loaded < 1:
            raise ValueError(f"max_loaded = {max_loaded}: must be >= 1")
        self.model, self.dtype, self.device, self.max_loaded = model, dtype, device, max_loaded
        self.pipeline = pipeline
        self.cache: OrderedDict[tuple[str, str, int], LoraAdapter] = OrderedDict()
        self.current: _Current | None = None
        self.pins: dict[tuple[str, str, int], int] = {}  # adapters of running requests -> how many use them
        self.loads = 0  # adapter files read (tests, logs)
        self._linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self._missing = {n for n, m in model.named_modules() if type(m).__name__ == "PPMissingLayer"}
        self._hooked: set[str] = set()
        model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        model.register_forward_hook(self._post_hook, always_call=True)

    # -- adapters

    def get(self, spec: LoraSpec) -> LoraAdapter:
        """The loaded adapter of ``spec`` (read from its file on first use; least recently used evicted)."""
        if not spec.path:
            raise LoraError(f"lora {spec.name!r} is not registered (no file path); register it in [lora] adapters or "
                            f"with POST /v1/loras")
        ad = self.cache.get(spec.key)
        if ad is not None:
            self.cache.move_to_end(spec.key)
            return ad
        ad = self.load(spec)
        self.cache[spec.key] = ad
        self._evict(keep=spec.key)
        return ad

    def preload(self, specs: Sequence[LoraSpec]) -> int:
        """Load ``specs`` now (at start: ``[lora] adapters``), at most ``max_loaded`` of them, in order; a file
        that cannot be loaded is logged and skipped (a request naming it gets the error). Returns how many loaded."""
        n = 0
        for spec in specs[:self.max_loaded]:
            try:
                self.get(spec)
                n += 1
            except LoraError as e:
                logger.warning("lora %r not preloaded: %s", spec.name, e)
        return n

    def acquire(self, specs: Sequence[LoraSpec]) -> list[tuple[LoraAdapter, float]]:
        """The adapters of a request, each with its scale, pinned (:meth:`unpin` them when it leaves); if one
        cannot be loaded, none stays pinned and the error names it."""
        out: list[tuple[LoraAdapter, float]] = []
        try:
            for spec in specs:
                ad = self.get(spec)
                self.pin([ad])
                out.append((ad, spec.scale))
        except BaseException:
            self.unpin([ad for ad, _ in out])
            raise
        return out

    def pin(self, adapters: Sequence[LoraAdapter]) -> None:
        """``adapters`` are used by a running request: not evicted until :meth:`unpin`."""
        for ad in adapters:
            self.pins[ad.key] = self.pins.get(ad.key, 0) + 1

    def unpin(self, adapters: Sequence[LoraAdapter]) -> None:
        for ad in adapters:
            left = self.pins.get(ad.key, 0) - 1
            if left > 0:
                self.pins[ad.key] = left
            else:
                self.pins.pop(ad.key, None)
        self._evict()

    def _evict(self, keep: tuple[str, str, int] | None = None) -> None:
        """Least recently used first, unused ones only (and never ``keep``, the one just asked for): while more
        than ``max_loaded`` are in use, more stay."""
        for key in list(self.cache):
            if len(self.cache) <= self.max_loaded:
                return
            if key not in self.pins and key != keep:
                old = self.cache.pop(key)
                logger.info("lora %r evicted (max_loaded = %d)", old.name, self.max_loaded)

    def load(self, spec: LoraSpec) -> LoraAdapter:
        who = f"lora {spec.name!r} ({spec.path})"
        state, meta = read_lora_file(spec.path, spec.name)
        ad = LoraAdapter(spec.name, spec.key)
        for mod, (A, B, scaling) in parse_lora(state, meta, who, self.pipeline).items():
            if self._held_elsewhere(mod):
                continue  # pipeline parallel: another stage holds this layer
            lin = self._linears.get(mod)
            check_layer(who, mod, A, B, (lin.out_features, lin.in_features) if lin is not None else None)
            ad.layers[mod] = LoraLayer(A.to(self.device, self.dtype).contiguous(),
                                       B.to(self.device, self.dtype).contiguous(), scaling)
        for mod in ad.layers:
            self._hook(mod)
        self.loads += 1
        logger.info("lora %r loaded: %d layers, %d bytes", spec.name, len(ad.layers), ad.nbytes)
        return ad

    def _held_elsewhere(self, mod: str) -> bool:
        parts = mod.split(".")
        return any(".".join(parts[:i]) in self._missing for i in range(1, len(parts) + 1))

    def _hook(self, mod: str) -> None:
        if mod in self._hooked:
            return
        lin = self._linears[mod]
        setattr(lin, _MARK, (self, mod))
        # first of the layer's forward hooks: it must see the layer's own output, before sequence parallel's hooks
        # shard (x_embedder) or gather (proj_out) it, so the LoRA term has the tokens of the layer's input
        lin.register_forward_hook(self._linear_hook, prepend=True)
        self._hooked.add(mod)

    # -- a forward

    def begin(self, adapters: Sequence[LoraAdapter], scales: torch.Tensor) -> None:
        """Make ``scales`` (rows, K) of ``adapters`` (K) the LoRA of the next forwards. Each adapter's rows become
        a segment: every row (None), a contiguous run (a ``slice``: views, no copies) or an index tensor."""
        rows: list[tuple[slice | torch.Tensor | None, torch.Tensor]] = []
        n = scales.shape[0]
        for k in range(len(adapters)):
            col = scales[:, k]
            used = (col != 0).nonzero().flatten()
            m = used.numel()
            if m == n:
                rows.append((None, col.to(self.dtype)))
            elif m and int(used[-1]) - int(used[0]) == m - 1:
                a = int(used[0])
                rows.append((slice(a, a + m), col[a:a + m].to(self.dtype)))
            else:
                rows.append((used, col.index_select(0, used).to(self.dtype)))
        self.current = _Current(list(adapters), rows, n)

    def end(self) -> None:
        self.current = None

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        scales, adapters = kwargs.pop(ROW_ARG, None), kwargs.pop(SHARED_ARG, None)
        if scales is None or not adapters:
            self.current = None
            return args, kwargs
        self.begin(adapters, scales)
        return args, kwargs

    def _post_hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.current = None

    def active(self, mod: str) -> bool:
        cur = self.current
        return cur is not None and any(mod in a.layers for a in cur.adapters)

    def _linear_hook(self, lin: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        cur = self.current
        if cur is None:
            return None
        mod = getattr(lin, _MARK)[1]
        x = args[0]
        if x.shape[0] != cur.n:
            raise RuntimeError(f"LoRA on {mod}: the input has {x.shape[0]} rows, the forward {cur.n}")
        for ad, (rows, w) in zip(cur.adapters, cur.rows, strict=True):
            layer = ad.layers.get(mod)
            if layer is None or w.numel() == 0:
                continue
            scale = (w * layer.scaling).view((-1,) + (1,) * (x.dim() - 1))
            if rows is None:  # every row: one matmul pair over the whole batch
                out.add_(F.linear(F.linear(x, layer.A), layer.B).mul_(scale))
            elif isinstance(rows, slice):  # a contiguous run of rows: views in, in place out
                out[rows].add_(F.linear(F.linear(x[rows], layer.A), layer.B).mul_(scale))
            else:  # scattered rows: gathered, and added back in place
                d = F.linear(F.linear(x.index_select(0, rows), layer.A), layer.B).mul_(scale)
                out.index_add_(0, rows, d)
        return out


def lora_active(linear: nn.Module) -> bool:
    """Whether ``linear`` has LoRA to add in the current forward (``cpu_linear`` skips its fused path then)."""
    mark = getattr(linear, _MARK, None)
    return mark is not None and mark[0].active(mark[1])
