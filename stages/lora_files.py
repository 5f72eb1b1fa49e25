"""LoRA adapter files: read, converted to diffusers' layout and checked against a model (``stages.lora`` applies
them per request).

**Files.** Diffusers' LoRA layout (what ``pipeline.save_lora_weights`` writes, PEFT keys):
``transformer.<module>.lora_A.weight`` (r, in) and ``transformer.<module>.lora_B.weight`` (out, r), with
``lora_alpha`` / ``r`` / ``alpha_pattern`` / ``rank_pattern`` from the ``lora_adapter_metadata`` of the file when
present, else ``<module>.alpha`` tensors, else ``alpha = r`` (scale 1), as diffusers does. Module names are the
diffusers model's, which ours mirror. Other layouts (kohya ``lora_unet_*`` with ``lora_down``/``lora_up``,
PEFT ``base_model.model.*``, xlabs, ...) are first converted by the model's diffusers pipeline class's own
``lora_state_dict`` (the detection and converters ``load_lora_weights`` runs: :func:`convert_lora_state`); what
it cannot convert, text-encoder keys and DoRA are refused by name.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from omni_runtime.stages.errors import RequestError
from omni_runtime.stages.weights import read_safetensors_header, safetensors_files

logger = logging.getLogger(__name__)

__all__ = ["LoraError", "check_layer", "check_lora_file", "convert_lora_state", "parse_lora", "pipeline_class_of",
           "read_lora_file"]

#: the prefix of the denoiser's keys in a pipeline's LoRA file
PREFIX = "transformer."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


class LoraError(RequestError):
    """An adapter file that cannot be used: missing, corrupt, in a layout we do not read, or for another model."""


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


def check_layer(who: str, mod: str, A: torch.Tensor, B: torch.Tensor, shape: tuple[int, int] | None) -> None:
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
        check_layer(who, mod, A, B, shapes.get(mod))
    return {"layers": len(layers), "rank": max(A.shape[0] for A, _, _ in layers.values()),
            "bytes": sum(t.numel() * t.element_size() for t in state.values())}
