"""Sequence-parallel plans: how a model's tensors are split and gathered, declared as ``_sp_plan``.

Conventions follow diffusers' ``_cp_plan``::

    _sp_plan = {
        "": {"hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3)},    # model's own inputs
        "rope": {0: SequenceParallelInput(split_dim=0, expected_dims=2, split_output=True)},  # output 0 of .rope
        "blocks.*": {"temb": ...},                                                      # every child of blocks
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),              # gather .proj_out's output
    }

Keys are submodule paths ("" = the model itself; a ``*`` segment matches any child name).
A dict value maps a forward argument (name, or positional index) to an input plan; entries
with ``split_output=True`` are keyed by output index and split that output instead. A
``SequenceParallelOutput`` value (or a list/tuple of them, by output index) gathers outputs.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Union

from torch import nn

logger = logging.getLogger(__name__)


class SPPlanError(ValueError):
    """A ``_sp_plan`` is malformed; the message names the entry, the value and what is allowed."""


@dataclass(frozen=True)
class SequenceParallelInput:
    """Split a tensor along ``split_dim`` (diffusers' ContextParallelInput).

    ``auto_pad=True`` pads the dim to a multiple of the SP size and records a key-padding
    mask that attention reads, and the output gather strips the pad again.
    """

    split_dim: int
    expected_dims: int | None = None
    split_output: bool = False
    auto_pad: bool = False


@dataclass(frozen=True)
class SequenceParallelOutput:
    """Gather a tensor along ``gather_dim`` (diffusers' ContextParallelOutput)."""

    gather_dim: int
    expected_dims: int | None = None


@dataclass(frozen=True)
class SequenceParallelPartialInput:
    """Keep the leading text part of ``split_dim`` whole and split the image part after it.

    ``text_len_source``: an int (fixed text length) or the name of a forward argument of the
    module (or of the model's own forward) holding the text length: an int, or a tensor whose
    text length is ``shape[0]`` for 1-D/2-D tensors (ids) and ``shape[1]`` otherwise (batch first).
    """

    split_dim: int
    text_len_source: str | int
    expected_dims: int | None = None
    split_output: bool = False


SequenceParallelInputType = Union[
    dict[Union[str, int], Union[SequenceParallelInput, SequenceParallelPartialInput]],
]
SequenceParallelOutputType = Union[SequenceParallelOutput, list[SequenceParallelOutput], tuple[SequenceParallelOutput, ...]]
SequenceParallelModelPlan = dict[str, Union[SequenceParallelInputType, SequenceParallelOutputType]]

_INPUT_TYPES = (SequenceParallelInput, SequenceParallelPartialInput)


def get_sp_plan_from_model(model: nn.Module) -> SequenceParallelModelPlan | None:
    """The model's ``_sp_plan`` (class or instance attribute), or None if it declares none."""
    plan = getattr(model, "_sp_plan", None)
    return plan if plan else None


def resolve_module_path(model: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """Every submodule matching ``path`` ("" = model; ``*`` matches any one child name)."""
    if path == "":
        return [("", model)]
    found: list[tuple[str, nn.Module]] = [("", model)]
    for segment in path.split("."):
        nxt: list[tuple[str, nn.Module]] = []
        for prefix, mod in found:
            for name, child in mod.named_children():
                if segment == "*" or segment == name:
                    nxt.append((f"{prefix}.{name}" if prefix else name, child))
        found = nxt
    return found


def _forward_params(module: nn.Module) -> list[str]:
    try:
        return [p for p in inspect.signature(module.forward).parameters if p not in ("self",)]
    except (TypeError, ValueError):
        return []


def _check_dims(where: str, dim_name: str, dim: object, expected: object) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise SPPlanError(f"{where}.{dim_name} = {dim!r} must be an int")
    if expected is not None:
        if isinstance(expected, bool) or not isinstance(expected, int) or expected <= 0:
            raise SPPlanError(f"{where}.expected_dims = {expected!r} must be a positive int or None")
        if not -expected <= dim < expected:
            raise SPPlanError(f"{where}.{dim_name} = {dim} is out of range for expected_dims={expected}; "
                              f"allowed {-expected}..{expected - 1}")


def _check_input(where: str, key: object, value: object, root_params: list[str], params: list[str] | None) -> None:
    if isinstance(value, SequenceParallelOutput):
        raise SPPlanError(f"{where} is a SequenceParallelOutput inside an input dict; gather plans are the whole "
                          "value of a module path, e.g. {'proj_out': SequenceParallelOutput(gather_dim=1)}")
    if not isinstance(value, _INPUT_TYPES):
        raise SPPlanError(f"{where} = {value!r} must be a SequenceParallelInput or SequenceParallelPartialInput")
    _check_dims(where, "split_dim", value.split_dim, value.expected_dims)
    if value.split_output and not isinstance(key, int):
        raise SPPlanError(f"{where} has split_output=True, so its key must be the output index (int), not {key!r}")
    if isinstance(key, bool) or (isinstance(key, int) and key < 0):
        raise SPPlanError(f"{where}: key {key!r} must be a forward-argument name or a non-negative index")
    if params is not None and isinstance(key, str) and params and key not in params:
        raise SPPlanError(f"{where}: the module's forward has no argument {key!r}; it has {params}")
    if isinstance(value, SequenceParallelPartialInput):
        src = value.text_len_source
        if isinstance(src, bool) or not isinstance(src, (str, int)):
            raise SPPlanError(f"{where}.text_len_source = {src!r} must be an int >= 0 or a forward-argument name")
        if isinstance(src, int) and src < 0:
            raise SPPlanError(f"{where}.text_len_source = {src} must be >= 0")
        if isinstance(src, str):
            if not src.isidentifier():
                raise SPPlanError(f"{where}.text_len_source = {src!r} is not an argument name")
            if params is not None and src not in params and src not in root_params:
                raise SPPlanError(f"{where}.text_len_source = {src!r} is not a forward argument of the module "
                                  f"({params}) nor of the model ({root_params})")
    elif value.auto_pad not in (True, False):
        raise SPPlanError(f"{where}.auto_pad = {value.auto_pad!r} must be a bool")


def validate_sp_plan(plan: SequenceParallelModelPlan, model: nn.Module | None = None) -> None:
    """Raise :class:`SPPlanError` naming the first bad entry of ``plan``.

    With ``model``, module paths (wildcards included) must match at least one submodule and
    argument names must exist in the matched modules' ``forward``.
    """
    if not isinstance(plan, dict):
        raise SPPlanError(f"_sp_plan must be a dict of module path -> plan; got {type(plan).__name__}")
    root_params = _forward_params(model) if model is not None else []
    for path, value in plan.items():
        if not isinstance(path, str):
            raise SPPlanError(f"_sp_plan key {path!r} must be a str module path ('' for the model itself)")
        where = f"_sp_plan[{path!r}]"
        if any(seg == "" for seg in path.split(".")) and path != "":
            raise SPPlanError(f"{where}: module path {path!r} has an empty segment")
        modules = None
        if model is not None:
            modules = resolve_module_path(model, path)
            if not modules:
                raise SPPlanError(f"{where}: module path {path!r} matches no submodule of "
                                  f"{type(model).__name__}")
        if isinstance(value, SequenceParallelOutput):
            _check_dims(where, "gather_dim", value.gather_dim, value.expected_dims)
        elif isinstance(value, (list, tuple)):
            if not value:
                raise SPPlanError(f"{where} is an empty list; give at least one SequenceParallelOutput")
            for i, item in enumerate(value):
                if item is None:
                    continue
                if not isinstance(item, SequenceParallelOutput):
                    raise SPPlanError(f"{where}[{i}] = {item!r} must be a SequenceParallelOutput or None")
                _check_dims(f"{where}[{i}]", "gather_dim", item.gather_dim, item.expected_dims)
        elif isinstance(value, dict):
            if not value:
                raise SPPlanError(f"{where} is an empty dict")
            for key, item in value.items():
                if not isinstance(key, (str, int)):
                    raise SPPlanError(f"{where} key {key!r} must be an argument name (str) or an index (int)")
                for mpath, mod in modules or [(path, None)]:
                    params = _forward_params(mod) if mod is not None else None
                    _check_input(f"{where}[{key!r}]" + (f" (module {mpath!r})" if mpath != path else ""),
                                 key, item, root_params, params)
        else:
            raise SPPlanError(f"{where} = {value!r} must be a dict of input plans, a SequenceParallelOutput, "
                              "or a list/tuple of SequenceParallelOutput")
