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

**Files.** Diffusers' LoRA layout (what ``pipeline.save_lora_weights`` writes, PEFT keys):
``transformer.<module>.lora_A.weight`` (r, in) and ``transformer.<module>.lora_B.weight`` (out, r), with
``lora_alpha`` / ``r`` / ``alpha_pattern`` / ``rank_pattern`` from the ``lora_adapter_metadata`` of the file when
present, else ``<module>.alpha`` tensors, else ``alpha = r`` (scale 1), as diffusers does. Module names are the
diffusers model's, which ours mirror. Other layouts (kohya ``lora_unet_*`` with ``lora_down``/``lora_up``,
PEFT ``base_model.model.*``, xlabs, ...) are first converted by the model's diffusers pipeline class's own
``lora_state_dict`` (the detection and converters ``load_lora_weights`` runs: :func:`convert_lora_state`); what
it cannot convert, text-encoder keys and DoRA are refused by name.

**Where adapters live.** Every denoiser rank holds its own :class:`LoraBank`: the config's adapters
(``[lora] adapters``, :func:`configured_specs`) load at start (:meth:`LoraBank.preload`, at most ``max_loaded``),
others from their file on the first admit that names them (every rank admits the same items at the same step
boundary, so all ranks load alike), at most ``max_loaded`` stay cached: the least recently used one that no
running request uses leaves first (an adapter in use is pinned; while more than ``max_loaded`` are in use, more
stay until their requests leave). Under pipeline parallelism a rank keeps only the layers it holds; under HSDP the adapter
weights are replicated (not sharded) on every rank.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_runtime.stages.errors import RequestError
from omni_runtime.stages.weights import read_safetensors_header, safetensors_files

logger = logging.getLogger(__name__)

__all__ = ["LoraAdapter", "LoraBank", "LoraError", "LoraSpec", "check_lora_file", "convert_lora_state", "parse_lora",
           "configured_specs", "pipeline_class_of", "read_lora_file"]

#: the prefix of the denoiser's keys in a pipeline's LoRA file
PREFIX = "transformer."
#: model keyword arguments the running set passes (taken out by :class:`LoraBank`'s pre-hook)
ROW_ARG, SHARED_ARG = "lora_scales", "lora_adapters"
_MARK = "_omni_lora"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


class LoraError(RequestError):
    """An adapter file that cannot be used: missing, corrupt, in a layout we do not read, or for another model."""


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


# --- files ------------------------------------------------------------------------------------------------------


def read_lora_file(path: str | Path, name: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a ``.safetensors`` LoRA file; :class:`LoraError` naming the file for one
    that is missing, not safetensors, or corrupt."""
    from safetensors import safe_open

    p = Path(path)
    who = f"lora {name!r}: {p}" if name else str(p)
    if not p.is_file():
        raise LoraError(f"{who}: no such file")
    if p.suffix != ".safetensors":
        raise LoraError(f"{who}: not a .safetensors file (pickled .bin/.pt adapters are not loaded)")
    try:
        read_safetensors_header(p)  # sizes and offsets checked before any byte is trusted
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except LoraError:
        raise
    except Exception as e:  # CheckpointError from the header check, or safetensors' own error
        raise LoraError(f"{who}: corrupt or unreadable safetensors file ({e})") from None
    if not state:
        raise LoraError(f"{who}: the file holds no tensors")
    return state, meta


_TE_PREFIXES = ("text_encoder", "te_", "te1", "te2")


def _is_diffusers_layout(keys: Sequence[str]) -> bool:
    """Whether every key is diffusers' own layout (``transformer.`` / text-encoder ``<module>.lora_A|B.*`` or
    ``<module>.alpha``): read as it is; anything else goes through diffusers' converter first."""
    return all(k.startswith((PREFIX,) + _TE_PREFIXES) and (".lora_A." in k or ".lora_B." in k or k.endswith(".alpha"))
               for k in keys)


def _layout_name(keys: Sequence[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya layout (lora_unet_* / lora_te* keys)"
    if any(".lora_down." in k or ".lora_up." in k for k in keys):
        return "lora_down / lora_up layout"
    if any(k.startswith("base_model.") for k in keys):
        return "PEFT layout (base_model.model.* keys)"
    return "non-diffusers layout"


def _layout_refusal(keys: Sequence[str]) -> str | None:
    """Why keys cannot be read (after diffusers' conversion, when there was one), or None."""
    if any("lora_magnitude_vector" in k or "dora_scale" in k for k in keys):
        return "DoRA (lora_magnitude_vector / dora_scale keys) is not supported"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_up." in k for k in keys):
        return f"{_layout_name(keys)} that diffusers' loader did not convert for this model"
    return None


def convert_lora_state(state: Mapping[str, torch.Tensor], pipeline: str | None, who: str
                       ) -> dict[str, torch.Tensor]:
    """``state`` in diffusers' layout. A file already in it is returned as it is; any other layout (kohya
    ``lora_unet_*``, ``lora_down``/``lora_up``, PEFT ``base_model.model.*``, ...) goes through the pipeline class's
    own ``lora_state_dict`` (what ``load_lora_weights`` runs first: diffusers' detection and converters), so it is
    read exactly as diffusers reads it. Converted keys outside ``transformer.*`` and the text encoders (a kohya
    ``img_in`` becomes ``x_embedder.*``) are dropped with a warning, as ``load_lora_weights`` ignores them.
    :class:`LoraError` for DoRA, for a layout with no ``pipeline`` (None: no conversion) and for a file the
    converter refuses."""
    keys = list(state)
    if any("lora_magnitude_vector" in k or "dora_scale" in k for k in keys):
        raise LoraError(f"{who}: DoRA (lora_magnitude_vector / dora_scale keys) is not supported")
    if _is_diffusers_layout(keys):
        return dict(state)
    layout = _layout_name(keys)
    if pipeline is None:
        raise LoraError(f"{who}: {layout}; no diffusers pipeline class is known to convert it: load it in "
                        f"diffusers and save it with save_lora_weights")
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline, None)
    if cls is None or not hasattr(cls, "lora_state_dict"):
        raise LoraError(f"{who}: {layout}; diffusers' {pipeline} has no LoRA loader to convert it")
    kwargs: dict[str, Any] = {}
    if "return_alphas" in inspect.signature(cls.lora_state_dict).parameters:
        kwargs["return_alphas"] = True
    try:
        out = cls.lora_state_dict({k: v.clone() for k, v in state.items()}, **kwargs)
    except Exception as e:  # the converters raise ValueError / KeyError / AssertionError on what they cannot read
        raise LoraError(f"{who}: {layout} that diffusers' {pipeline}.lora_state_dict could not convert "
                        f"({type(e).__name__}: {e})") from None
    if isinstance(out, tuple):  # (state, network alphas): alphas popped from the keys, put back as <module>.alpha
        out, alphas = out[0], (out[1] or {})
        out = {**out, **{k: (v if torch.is_tensor(v) else torch.tensor(float(v))) for k, v in alphas.items()}}
    out = dict(out)
    if set(out) == set(keys):  # nothing converted: read (and refused) as it is
        return out
    dropped = sorted(k for k in out if not k.startswith((PREFIX,) + _TE_PREFIXES))
    if dropped:
        logger.warning("%s: %d converted keys outside transformer.* are ignored, as diffusers' load_lora_weights "
                       "ignores them (%s, ...)", who, len(dropped), dropped[0])
        out = {k: v for k, v in out.items() if k not in set(dropped)}
    logger.info("%s: %s converted to diffusers' layout by %s.lora_state_dict (%d keys)", who, layout, pipeline,
                len(out))
    return out


def parse_lora(state: Mapping[str, torch.Tensor], meta: Mapping[str, str], who: str, pipeline: str | None = None
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A LoRA file's tensors -> ``{module name: (A, B, alpha / r)}``: another layout is first converted by
    diffusers' ``<pipeline>.lora_state_dict`` (:func:`convert_lora_state`); :class:`LoraError` naming what is
    refused (text-encoder keys, layouts diffusers does not convert, DoRA, a lone A or B, ranks that disagree)."""
    state = convert_lora_state(state, pipeline, who)
    keys = list(state)
    why = _layout_refusal(keys)
    if why:
        raise LoraError(f"{who}: {why}")
    te = sorted(k for k in keys if k.startswith(_TE_PREFIXES))
    if te:
        raise LoraError(f"{who}: the file holds text-encoder LoRA ({te[0]}, {len(te)} keys); only the denoiser "
                        f"(transformer.*) is adapted: save the adapter without text-encoder layers")
    other = sorted(k for k in keys if not k.startswith(PREFIX))
    if other:
        raise LoraError(f"{who}: key {other[0]!r} is not a transformer.* LoRA key (diffusers' layout: "
                        f"transformer.<module>.lora_A.weight / lora_B.weight)")
    cfg: dict[str, Any] = {}
    raw = meta.get("lora_adapter_metadata")
    if raw:
        try:
            cfg = json.loads(raw)
        except ValueError:
            raise LoraError(f"{who}: lora_adapter_metadata is not JSON") from None
        if not isinstance(cfg, dict):
            cfg = {}
        elif isinstance(cfg.get("transformer"), dict):
            cfg = cfg["transformer"]
        elif any(k.startswith(PREFIX) for k in cfg):  # diffusers flattens it: "transformer.lora_alpha"
            cfg = {k[len(PREFIX):]: v for k, v in cfg.items() if k.startswith(PREFIX)}
        if cfg.get("use_dora"):
            raise LoraError(f"{who}: DoRA (use_dora = true) is not supported")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for k, t in state.items():
        k = k[len(PREFIX):]
        if k.endswith(".alpha"):
            alphas[k[:-len(".alpha")]] = float(t.item())
            continue
        m = _KEY.match(k)
        if m is None:
            if k.endswith((".lora_A.bias", ".lora_B.bias")):
                raise LoraError(f"{who}: LoRA biases ({PREFIX}{k}) are not supported")
            raise LoraError(f"{who}: key {PREFIX + k!r} is not a LoRA weight (expected <module>.lora_A.weight / "
                            f"lora_B.weight)")
        if t.dim() != 2:
            raise LoraError(f"{who}: {PREFIX + k} has shape {tuple(t.shape)}; LoRA of linear layers is 2-D")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    out = {}
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoraError(f"{who}: {PREFIX}{mod} has lora_{next(iter(ab))} but no lora_{'B' if 'A' in ab else 'A'}")
        A, B = ab["A"], ab["B"]
        r = A.shape[0]
        if B.shape[1] != r:
            raise LoraError(f"{who}: {PREFIX}{mod}: lora_A has rank {r}, lora_B {tuple(B.shape)} (rank "
                            f"{B.shape[1]})")
        alpha = _pattern(cfg.get("alpha_pattern"), mod, cfg.get("lora_alpha")) if cfg else None
        if alpha is None:
            alpha = alphas.get(mod, r)
        out[mod] = (A, B, float(alpha) / r)
    if not out:
        raise LoraError(f"{who}: no transformer LoRA layers in the file")
    return out


def _pattern(pattern: Any, module: str, default: Any) -> Any:
    """peft's ``alpha_pattern`` lookup: the first key that names ``module`` (a suffix or a regex), else default."""
    for k, v in (pattern or {}).items():
        if module == k or module.endswith("." + k) or re.fullmatch(f"(.*\\.)?{k}", module):
            return v
    return default


def linear_shapes_of_checkpoint(model_dir: str | Path) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of every 2-D ``<module>.weight`` of the transformer's checkpoint (headers only)."""
    from omni_runtime.stages.weights import component_dir

    shapes = {}
    for f in safetensors_files(component_dir(model_dir, "transformer")):
        for k, e in read_safetensors_header(f).items():
            if k.endswith(".weight") and len(e["shape"]) == 2:
                shapes[k[:-len(".weight")]] = (int(e["shape"][0]), int(e["shape"][1]))
    return shapes


def pipeline_class_of(model_dir: str | Path) -> str | None:
    """The diffusers pipeline class of a model directory (``model_index.json`` ``_class_name``), whose
    ``lora_state_dict`` converts other LoRA layouts; None when there is none."""
    from omni_runtime.stages.weights import MODEL_INDEX, read_json

    try:
        name = read_json(Path(model_dir) / MODEL_INDEX).get("_class_name")
    except Exception:  # no model_index.json: other layouts are refused
        return None
    return name if isinstance(name, str) else None


def _check_layer(who: str, mod: str, A: torch.Tensor, B: torch.Tensor, shape: tuple[int, int] | None) -> None:
    if shape is None:
        raise LoraError(f"{who}: {PREFIX}{mod} is not a linear layer of this model (an adapter for another model?)")
    out_f, in_f = shape
    if A.shape[1] != in_f or B.shape[0] != out_f:
        raise LoraError(f"{who}: {PREFIX}{mod}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit the "
                        f"layer's {in_f} inputs and {out_f} outputs (an adapter for another model?)")


def check_lora_file(path: str | Path, model_dir: str | Path, name: str = "") -> dict[str, Any]:
    """Validate an adapter file against the model's transformer checkpoint without loading the model: layout,
    module names and shapes. Returns a summary (``layers``, ``rank``, ``bytes``); :class:`LoraError` otherwise."""
    who = f"lora {name!r} ({path})" if name else str(path)
    state, meta = read_lora_file(path, name)
    layers = parse_lora(state, meta, who, pipeline_class_of(model_dir))
    shapes = linear_shapes_of_checkpoint(model_dir)
    for mod, (A, B, _) in layers.items():
        _check_layer(who, mod, A, B, shapes.get(mod))
    return {"layers": len(layers), "rank": max(A.shape[0] for A, _, _ in layers.values()),
            "bytes": sum(t.numel() * t.element_size() for t in state.values())}


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
            _check_layer(who, mod, A, B, (lin.out_features, lin.in_features) if lin is not None else None)
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
