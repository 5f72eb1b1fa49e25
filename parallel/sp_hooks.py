"""Applying an ``_sp_plan``: forward hooks that shard inputs and gather outputs over the SP group.

``apply_sequence_parallel(model, group, plan)`` validates the plan against the model and
registers, for every module the plan names, a forward pre-hook (split inputs) and/or a
forward hook (split outputs with ``split_output=True``, gather ``SequenceParallelOutput``), over the SP
``group`` it is given (``mesh.group("sp")``; :class:`parallel.strategies.SequenceParallel` calls it at load).
A pre-hook on the model opens an :class:`SPForwardContext` for the pass (auto_pad masks,
padded lengths, the model's arguments for ``text_len_source``); the model's last hook
closes it and checks that what the plan sharded was gathered.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from omni_runtime.parallel.attention.sp_context import (
    SPForwardContext,
    pop_sp_forward_context,
    push_sp_forward_context,
)
from omni_runtime.parallel.sp_plan import (
    SequenceParallelInput,
    SequenceParallelModelPlan,
    SequenceParallelOutput,
    SequenceParallelPartialInput,
    SPPlanError,
    get_sp_plan_from_model,
    resolve_module_path,
    validate_sp_plan,
)
from omni_runtime.parallel.sp_sharding import ShardingValidator, shard_offset, shard_sizes, sp_gather
from omni_runtime.parallel.utils import pad_dim

logger = logging.getLogger(__name__)

_HANDLES_ATTR = "_sp_hook_handles"
_SEQ = "sequence"


@dataclass
class _Run:
    """The state of the current forward pass of one SP-enabled model."""

    group: Any
    ctx: SPForwardContext | None = None
    validator: ShardingValidator = field(default_factory=ShardingValidator)
    check_gathers: bool = True


def _shard_seq(t: torch.Tensor, dim: int, auto_pad: bool, ctx: SPForwardContext, group: Any) -> torch.Tensor:
    world, rank = group.world_size, group.rank_in_group
    n = t.shape[dim]
    if auto_pad:
        padded = -(-n // world) * world
        ctx.padded_lengths[n] = padded
        if padded != n:
            per = padded // world
            pos = torch.arange(rank * per, (rank + 1) * per, device=t.device)
            ctx.key_padding_mask = pos < n
    if n in ctx.padded_lengths:
        padded = ctx.padded_lengths[n]
        per = padded // world
        ctx.record_layout((per,) * world)
        return pad_dim(t, dim, padded).narrow(dim, rank * per, per)
    sizes = shard_sizes(n, world)
    ctx.record_layout(tuple(sizes))
    return t.narrow(dim, shard_offset(n, world, rank), sizes[rank])


def _text_len(p: SequenceParallelPartialInput, values: dict[str, Any], ctx: SPForwardContext, where: str) -> int:
    src = p.text_len_source
    if isinstance(src, int):
        return src
    val = values.get(src, ctx.values.get(src))
    if isinstance(val, int) and not isinstance(val, bool):
        return val
    if isinstance(val, torch.Tensor):
        return int(val.shape[0] if val.dim() <= 2 else val.shape[1])
    raise SPPlanError(f"{where}.text_len_source={src!r}: the forward argument is {type(val).__name__}; "
                      "it must be an int or a tensor")


def _split(value: Any, p: SequenceParallelInput | SequenceParallelPartialInput, run: _Run, where: str,
           values: dict[str, Any]) -> Any:
    if not isinstance(value, torch.Tensor):
        if value is not None:
            logger.warning("%s: not a tensor (%s); left unsplit", where, type(value).__name__)
        return value
    if p.expected_dims is not None and value.dim() != p.expected_dims:
        logger.warning("%s: expected %d dims, got shape %s; left unsplit", where, p.expected_dims, tuple(value.shape))
        return value
    ctx = run.ctx
    dim = p.split_dim % value.dim()
    run.validator.record_shard(_SEQ)
    if isinstance(p, SequenceParallelPartialInput):
        t = _text_len(p, values, ctx, where)
        if not 0 <= t <= value.shape[dim]:
            raise SPPlanError(f"{where}: text length {t} does not fit dim {dim} of size {value.shape[dim]}")
        text = value.narrow(dim, 0, t)
        image = _shard_seq(value.narrow(dim, t, value.shape[dim] - t), dim, False, ctx, run.group)
        return torch.cat([text, image], dim=dim)
    return _shard_seq(value, dim, p.auto_pad, ctx, run.group)


def _gather(value: Any, p: SequenceParallelOutput, run: _Run, where: str) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if p.expected_dims is not None and value.dim() != p.expected_dims:
        logger.warning("%s: expected %d dims, got shape %s; not gathered", where, p.expected_dims, tuple(value.shape))
        return value
    dim = p.gather_dim % value.dim()
    full = sp_gather(value, dim, group=run.group)
    run.validator.record_gather(_SEQ)
    if run.ctx is not None:
        for orig, padded in run.ctx.padded_lengths.items():
            if padded != orig and full.shape[dim] == padded:
                full = full.narrow(dim, 0, orig)
                break
    return full


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    return dict(bound.arguments)


def _params(module: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


def _ensure_ctx(run: _Run) -> None:
    if run.ctx is None:  # a planned submodule called outside the model's forward
        run.ctx = SPForwardContext()


def _make_input_hook(path: str, entries: dict, run: _Run):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        _ensure_ctx(run)
        params = _params(module)
        values = _bind(module, args, kwargs)
        args = list(args)
        for key, p in entries.items():
            where = f"_sp_plan[{path!r}][{key!r}]"
            if isinstance(key, int):
                if key < len(args):
                    args[key] = _split(args[key], p, run, where, values)
            elif key in kwargs:
                kwargs[key] = _split(kwargs[key], p, run, where, values)
            elif key in params and params.index(key) < len(args):
                i = params.index(key)
                args[i] = _split(args[i], p, run, where, values)
        return tuple(args), kwargs

    return hook


def _make_output_hook(path: str, split_entries: dict, gathers: list | None, run: _Run):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
        _ensure_ctx(run)
        single = isinstance(output, torch.Tensor)
        outs = [output] if single else list(output) if isinstance(output, (tuple, list)) else None
        if outs is None:
            raise SPPlanError(f"_sp_plan[{path!r}]: output of type {type(output).__name__} cannot be split or "
                              "gathered; it must be a tensor or a tuple/list of tensors")
        values = _bind(module, args, kwargs)
        for idx, p in split_entries.items():
            if idx < len(outs):
                outs[idx] = _split(outs[idx], p, run, f"_sp_plan[{path!r}][{idx}]", values)
        for idx, p in enumerate(gathers or []):
            if p is not None and idx < len(outs):
                outs[idx] = _gather(outs[idx], p, run, f"_sp_plan[{path!r}][{idx}]")
        if single:
            return outs[0]
        return type(output)(outs) if isinstance(output, tuple) else outs

    return hook


def apply_sequence_parallel(
    model: nn.Module,
    group: Any,
    plan: SequenceParallelModelPlan | None = None,
    *,
    check_gathers: bool = True,
) -> nn.Module:
    """Register the hooks of ``plan`` (default: ``model._sp_plan``) on ``model``, over the SP ``group`` (a
    ``GroupCoordinator``); returns the model.

    ``check_gathers``: raise after a forward in which the plan sharded inputs but gathered nothing.
    """
    if not hasattr(group, "world_size") or not hasattr(group, "rank_in_group"):
        raise SPPlanError(f"apply_sequence_parallel: group={group!r} is not a GroupCoordinator "
                          "(pass mesh.group('sp'))")
    if getattr(model, _HANDLES_ATTR, None):
        raise SPPlanError(f"{type(model).__name__} already has sequence parallel hooks; "
                          "call remove_sequence_parallel first")
    plan = plan if plan is not None else get_sp_plan_from_model(model)
    if plan is None:
        raise SPPlanError(f"{type(model).__name__} declares no _sp_plan and none was passed")
    validate_sp_plan(plan, model)
    world = group.world_size
    run = _Run(group=group, check_gathers=check_gathers)
    handles: list = []

    def open_ctx(module: nn.Module, args: tuple, kwargs: dict):
        run.ctx = SPForwardContext(values=_bind(module, args, kwargs))
        run.validator.reset()
        run.validator._enabled = True
        push_sp_forward_context(run.ctx)
        return None

    def close_ctx(module: nn.Module, args: tuple, kwargs: dict, output: Any):
        ctx, run.ctx = run.ctx, None
        run.validator._enabled = False
        if ctx is not None:
            pop_sp_forward_context(ctx)
        if run.check_gathers:
            run.validator.validate()
        return None

    handles.append(model.register_forward_pre_hook(open_ctx, with_kwargs=True, prepend=True))
    for path, value in plan.items():
        for mpath, module in resolve_module_path(model, path):
            if isinstance(value, dict):
                inputs = {k: p for k, p in value.items() if not p.split_output}
                outputs = {k: p for k, p in value.items() if p.split_output}
                if inputs:
                    handles.append(module.register_forward_pre_hook(_make_input_hook(mpath, inputs, run),
                                                                    with_kwargs=True))
                if outputs:
                    handles.append(module.register_forward_hook(_make_output_hook(mpath, outputs, None, run),
                                                                with_kwargs=True))
            else:
                gathers = [value] if isinstance(value, SequenceParallelOutput) else list(value)
                handles.append(module.register_forward_hook(_make_output_hook(mpath, {}, gathers, run),
                                                            with_kwargs=True))
    handles.append(model.register_forward_hook(close_ctx, with_kwargs=True, always_call=True))
    setattr(model, _HANDLES_ATTR, handles)
    logger.info("sequence parallel hooks on %s: %d modules, SP size %d", type(model).__name__, len(handles) - 2, world)
    return model


def remove_sequence_parallel(model: nn.Module) -> nn.Module:
    """Remove every hook ``apply_sequence_parallel`` registered; the model is single-rank again."""
    for handle in getattr(model, _HANDLES_ATTR, None) or []:
        handle.remove()
    if hasattr(model, _HANDLES_ATTR):
        delattr(model, _HANDLES_ATTR)
    return model
