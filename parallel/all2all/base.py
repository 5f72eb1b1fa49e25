"""``All2AllManagerBase``: how an expert-parallel (EP) group moves MoE tokens to their experts and back.

A manager is built on the EP group's :class:`~omni_runtime.parallel.device_communicator.DeviceCommunicatorBase`
and runs every exchange through it (gloo on CPU, nccl on CUDA). The contract, per MoE layer call::

    h, w, ids[, extra] = manager.dispatch(x, topk_weights, topk_ids, is_sequence_parallel, extra_tensors)
    y = local_experts(h, w, ids)        # sum over k of w[:, k] * expert_{ids[:, k]}(h), local experts only
    out = manager.combine(y, is_sequence_parallel)   # (tokens of this rank, hidden), every expert summed

Expert placement is fixed: EP rank ``r`` of ``N`` holds the contiguous block of experts
:func:`local_expert_range` ``(num_experts, N, r)``.

Which ranks hold which tokens:

* ``is_sequence_parallel=True`` — every EP rank holds its own, distinct tokens (the sequence is split across
  the ranks); the exchange spans the whole EP group.
* ``is_sequence_parallel=False`` — the ranks of each of ``replica_groups`` hold *identical* tokens (e.g. the
  data-parallel ranks of a stage that all run the same batch). Each rank of such a group takes its
  ``tensor_split`` chunk of the tokens, the chunks are exchanged as above, and ``combine`` gathers the chunks
  back so that every replica gets the whole output. Without ``replica_groups`` (the default: every rank alone)
  the two modes are the same.

Counts travel as a small exchange before each dispatch (kind ``meta`` in the communicator's ``stats``); the
payload is counted per kind too (``dispatch``, ``combine``, ``all_gatherv``...: ``stats.bytes_by_kind``, see
:meth:`DeviceCommunicatorBase.all_to_allv`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from omni_runtime.parallel.device_communicator import DeviceCommunicatorBase

logger = logging.getLogger(__name__)


class All2AllError(ValueError):
    """A caller or config error of the all2all layer (bad backend name, expert count, shapes)."""


def local_expert_range(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """The global ids of the experts EP rank ``ep_rank`` of ``ep_size`` holds (a contiguous block)."""
    if num_experts % ep_size != 0:
        raise All2AllError(f"num_experts = {num_experts} is not divisible by the expert-parallel size ep = {ep_size}; "
                           f"every EP rank must hold the same number of experts")
    per = num_experts // ep_size
    return range(ep_rank * per, (ep_rank + 1) * per)


class All2AllManagerBase:
    """Base of every all2all manager; the subclasses implement ``_dispatch`` / ``_combine`` on distinct tokens.

    Args:
        communicator: the EP group's communicator (its world size is the EP size).
        replica_groups: lists of EP-group ranks that hold identical tokens when ``is_sequence_parallel=False``
            (they must partition ``range(world_size)``); ``None``: every rank alone.
        num_experts: the global expert count; may instead come from
            :meth:`prepare_communication_buffer_for_model`.
    """

    #: the name ``all2all_backend`` selects it by
    backend: str = ""
    #: ``dispatch`` returns ``(recv_x (local experts, rows, hidden), recv_count (local experts,), topk_ids)`` and
    #: ``combine`` takes the experts' outputs in that layout (DeepEP low-latency) instead of per-token rows
    expert_major: bool = False

    def __init__(self, communicator: DeviceCommunicatorBase, replica_groups: Sequence[Sequence[int]] | None = None,
                 num_experts: int | None = None) -> None:
        self.communicator = communicator
        self.world_size = communicator.world_size
        self.rank = communicator.rank_in_group
        self.replica_group: list[int] = [self.rank]
        # whether some ranks share tokens: then restoring them after combine is a collective every rank joins
        self.has_replicas = replica_groups is not None and any(len(g) > 1 for g in replica_groups)
        if replica_groups is not None:
            flat = sorted(int(r) for g in replica_groups for r in g)
            if flat != list(range(self.world_size)):
                raise All2AllError(f"replica_groups {list(map(list, replica_groups))} must partition the EP ranks "
                                   f"0..{self.world_size - 1}")
            self.replica_group = next(sorted(int(r) for r in g) for g in replica_groups if self.rank in g)
        self.num_experts: int | None = None
        self.hidden_size: int | None = None
        if num_experts is not None:
            self.set_num_experts(num_experts)
        self._replica_ctx: tuple[int, list[int]] | None = None

    # ------------------------------------------------------------------ model-dependent sizes
    def set_num_experts(self, num_experts: int) -> None:
        local_expert_range(num_experts, self.world_size, self.rank)  # validates divisibility
        self.num_experts = int(num_experts)

    @property
    def experts_per_rank(self) -> int:
        if self.num_experts is None:
            raise All2AllError(f"{type(self).__name__}: the number of experts is unknown; pass num_experts or call "
                               "prepare_communication_buffer_for_model(model) first")
        return self.num_experts // self.world_size

    def prepare_communication_buffer_for_model(self, model: nn.Module) -> None:
        """Read the MoE layers' sizes (modules with ``is_moe_layer``): expert count and hidden size."""
        for module in model.modules():
            if getattr(module, "is_moe_layer", False):
                if self.num_experts is not None and module.num_experts != self.num_experts:
                    raise All2AllError(f"MoE layers disagree on the expert count: {self.num_experts} and "
                                       f"{module.num_experts}")
                self.set_num_experts(module.num_experts)
                self.hidden_size = max(self.hidden_size or 0, int(module.hidden_size))

    # ------------------------------------------------------------------ token counts
    def token_counts(self, n: int, device: torch.device) -> list[int]:
        """Every EP rank's token count (one small all-gather, counted as kind ``meta``)."""
        local = torch.full((self.world_size,), n, dtype=torch.int64, device=device)
        ones = [1] * self.world_size
        return [int(v) for v in self.communicator.all_to_allv(local, ones, ones, kind="meta").tolist()]

    # ------------------------------------------------------------------ replicated tokens (not sequence parallel)
    def _take_chunk(self, tensors: list[torch.Tensor], is_sequence_parallel: bool) -> list[torch.Tensor]:
        if is_sequence_parallel or not self.has_replicas:
            self._replica_ctx = None
            return tensors
        n = tensors[0].shape[0]
        idx = self.replica_group.index(self.rank)
        sizes = [len(c) for c in torch.arange(n).tensor_split(len(self.replica_group))]
        self._replica_ctx = (n, sizes)
        start = sum(sizes[:idx])
        return [t[start:start + sizes[idx]] for t in tensors]

    def _restore_chunks(self, out: torch.Tensor) -> torch.Tensor:
        """All-gather-v of the chunks within this rank's replica group (zero rows to every other rank)."""
        if self._replica_ctx is None:
            return out
        _, sizes = self._replica_ctx
        self._replica_ctx = None
        send = [0] * self.world_size
        recv = [0] * self.world_size
        for i, r in enumerate(self.replica_group):
            send[r] = out.shape[0]
            recv[r] = sizes[i]
        return self.communicator.all_to_allv(out.repeat(len(self.replica_group), *([1] * (out.dim() - 1))),
                                             recv, send, kind="replica_gather")

    # ------------------------------------------------------------------ the interface
    def dispatch(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 is_sequence_parallel: bool = False, extra_tensors: list[torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | tuple[
                     torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Move tokens (rows of ``hidden_states``) to the ranks of their experts.

        Returns ``(hidden_states, topk_weights, topk_ids)`` as this rank's experts must see them, plus the
        ``extra_tensors`` (per-token, moved with their tokens) when given.
        """
        n = hidden_states.shape[0]
        if topk_ids.shape[0] != n or topk_weights.shape != topk_ids.shape:
            raise All2AllError(f"dispatch: hidden_states has {n} tokens but topk_weights {tuple(topk_weights.shape)} "
                               f"and topk_ids {tuple(topk_ids.shape)}; both must be (tokens, top_k)")
        extras = list(extra_tensors or [])
        for i, t in enumerate(extras):
            if t.shape[0] != n:
                raise All2AllError(f"dispatch: extra_tensors[{i}] has {t.shape[0]} rows, expected {n} (one per token)")
        parts = self._take_chunk([hidden_states, topk_weights, topk_ids, *extras], is_sequence_parallel)
        h, w, ids, moved_extras = self._dispatch(parts[0], parts[1], parts[2], parts[3:])
        if extra_tensors is not None:
            return h, w, ids, moved_extras
        return h, w, ids

    def dispatch_router_logits(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                               is_sequence_parallel: bool = False, extra_tensors: list[torch.Tensor] | None = None,
                               ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor,
                                                                              list[torch.Tensor]]:
        """Gather every token of the EP group with its router logits (routing then happens on every rank)."""
        raise All2AllError(f"{type(self).__name__} moves only routed tokens and cannot dispatch router logits; "
                           "route first and call dispatch(hidden_states, topk_weights, topk_ids), or use the "
                           "'naive' or 'agrs' backend")

    def combine(self, hidden_states: torch.Tensor, is_sequence_parallel: bool = False) -> torch.Tensor:
        """Return the expert outputs of the last :meth:`dispatch` to their tokens; (tokens, hidden) of this rank."""
        return self._restore_chunks(self._combine(hidden_states))

    def destroy(self) -> None:
        """Release what the manager holds (the CPU managers hold only the last dispatch's bookkeeping)."""
        self._replica_ctx = None

    # ------------------------------------------------------------------ for the subclasses
    def _dispatch(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  extras: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def _combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "ep_size": self.world_size, "ep_rank": self.rank,
                "replica_group": self.replica_group, "num_experts": self.num_experts}
