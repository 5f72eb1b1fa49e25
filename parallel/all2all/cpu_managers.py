"""The all2all managers that run on any torch.distributed backend (gloo on CPU, nccl on CUDA).

* :class:`NaiveAll2AllManager` — every rank broadcasts its tokens to all; combine is an all-reduce of the
  full token set, then each rank keeps its own slice. The simple reference.
* :class:`AgRsAll2AllManager` — dispatch is an all-gather-v (ranks may hold different token counts, 0
  included) of hidden states, top-k weights and ids; combine is a reduce-scatter-v back to each rank's tokens.
* :class:`AllToAllVManager` — only the (token, expert) pairs routed to a rank's experts travel to it, through
  one ``all_to_all_single`` with split sizes computed from ``topk_ids``; combine sends the expert outputs back
  and applies the top-k weights on the token's own rank.

With the gather-style managers (naive, agrs) every rank sees every token and computes only its local experts;
the per-token partial sums are added up in ``combine``. With all-to-all-v each rank sees one row per pair routed
to it, with ``topk_ids`` of shape ``(rows, 1)`` holding that pair's (global) expert id and ``topk_weights`` all
ones: the weights are applied in ``combine``, where the pair outputs come home.
"""

from __future__ import annotations

import logging

import torch

from omni_runtime.parallel.all2all.base import All2AllManagerBase

logger = logging.getLogger(__name__)


class _GatherAll2AllManager(All2AllManagerBase):
    """Dispatch gathers every token to every rank; subclasses choose the gather and the reduction."""

    _sizes: list[int] | None = None

    def _gather(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def _dispatch(self, hidden_states, topk_weights, topk_ids, extras):
        self._sizes = sizes = self.token_counts(hidden_states.shape[0], hidden_states.device)
        gathered = [self._gather(t, sizes) for t in (hidden_states, topk_weights, topk_ids, *extras)]
        return gathered[0], gathered[1], gathered[2], gathered[3:]

    def dispatch_router_logits(self, hidden_states, router_logits, is_sequence_parallel=False, extra_tensors=None):
        extras = list(extra_tensors or [])
        parts = self._take_chunk([hidden_states, router_logits, *extras], is_sequence_parallel)
        self._sizes = sizes = self.token_counts(parts[0].shape[0], hidden_states.device)
        gathered = [self._gather(t, sizes) for t in parts]
        if extra_tensors is not None:
            return gathered[0], gathered[1], gathered[2:]
        return gathered[0], gathered[1]

    def _require_sizes(self) -> list[int]:
        if self._sizes is None:
            raise RuntimeError(f"{type(self).__name__}.combine called without a preceding dispatch")
        sizes, self._sizes = self._sizes, None
        return sizes


class NaiveAll2AllManager(_GatherAll2AllManager):
    """Broadcast from every rank into one buffer of all tokens; combine = all-reduce + own slice."""

    backend = "naive"

    def _gather(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        comm = self.communicator
        buffer = torch.empty((sum(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
        start = sum(sizes[:self.rank])
        buffer[start:start + sizes[self.rank]] = t
        offset = 0
        for src, n in enumerate(sizes):
            if n:  # the communicator counts the source's slice reaching every other rank
                comm.broadcast(buffer[offset:offset + n], src=src)
            offset += n
        return buffer

    def _combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        sizes = self._require_sizes()
        if hidden_states.shape[0] != sum(sizes):
            raise ValueError(f"combine: got {hidden_states.shape[0]} rows, the dispatch gathered {sum(sizes)}")
        comm = self.communicator  # counts a ring all-reduce's 2 (W-1)/W of the buffer
        summed = comm.all_reduce(hidden_states) if hidden_states.numel() else hidden_states
        start = sum(sizes[:self.rank])
        return summed[start:start + sizes[self.rank]]


class AgRsAll2AllManager(_GatherAll2AllManager):
    """All-gather-v dispatch, reduce-scatter-v combine (uneven token counts, zero included)."""

    backend = "agrs"

    def _gather(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        n = t.shape[0]
        # all-gather-v as an all-to-all-v: this rank's rows to every rank, each rank's rows from it
        send = t.repeat(self.world_size, *([1] * (t.dim() - 1))) if n else t
        return self.communicator.all_to_allv(send, sizes, [n] * self.world_size, kind="all_gatherv")

    def _combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        sizes = self._require_sizes()
        if hidden_states.shape[0] != sum(sizes):
            raise ValueError(f"combine: got {hidden_states.shape[0]} rows, the dispatch gathered {sum(sizes)}")
        mine = sizes[self.rank]
        # reduce-scatter-v: rank j's rows go to rank j, which sums the W partials it receives
        parts = self.communicator.all_to_allv(hidden_states, [mine] * self.world_size, sizes,
                                              kind="reduce_scatterv")
        return parts.view(self.world_size, mine, *hidden_states.shape[1:]).sum(0)


class AllToAllVManager(All2AllManagerBase):
    """Only routed (token, expert) pairs travel: one all-to-all-v out, one back (DeepEP HT semantics, plain
    collectives). Pairs with ``topk_ids < 0`` are dropped (masked experts)."""

    backend = "alltoallv"

    _ctx: tuple | None = None

    def _dispatch(self, hidden_states, topk_weights, topk_ids, extras):
        comm = self.communicator
        n, top_k = topk_ids.shape
        per = self.experts_per_rank
        num_experts = per * self.world_size
        flat_ids = topk_ids.reshape(-1).long()
        if flat_ids.numel() and int(flat_ids.max()) >= num_experts:
            raise ValueError(f"dispatch: topk_ids holds expert {int(flat_ids.max())}, the model has {num_experts}")
        pairs = torch.nonzero(flat_ids >= 0).flatten()
        pairs = pairs[torch.argsort(flat_ids[pairs], stable=True)]  # by expert, hence by destination rank
        expert_of_pair = flat_ids[pairs]
        counts = torch.bincount(expert_of_pair, minlength=num_experts).view(self.world_size, per)
        # counts[j, e]: pairs this rank sends to rank j's local expert e; rank j receives one row of counts
        recv_counts = comm.all_to_allv(counts.to(torch.int64), [1] * self.world_size, [1] * self.world_size,
                                       kind="meta").view(self.world_size, per)
        send_splits = counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        token_of_pair = pairs // top_k
        moved = [comm.all_to_allv(t[token_of_pair], recv_splits, send_splits,
                                  kind="dispatch" if i == 0 else "dispatch_extra")
                 for i, t in enumerate((hidden_states, *extras))]
        mine = torch.arange(self.rank * per, (self.rank + 1) * per, device=topk_ids.device)
        recv_ids = torch.repeat_interleave(mine.repeat(self.world_size), recv_counts.reshape(-1).to(mine.device))
        recv_ids = recv_ids.to(topk_ids.dtype).view(-1, 1)
        recv_w = torch.ones(recv_ids.shape, dtype=topk_weights.dtype, device=topk_weights.device)
        self._ctx = (pairs, send_splits, recv_splits, n, top_k, topk_weights)
        return moved[0], recv_w, recv_ids, moved[1:]

    def _combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._ctx is None:
            raise RuntimeError("AllToAllVManager.combine called without a preceding dispatch")
        pairs, send_splits, recv_splits, n, top_k, weights = self._ctx
        self._ctx = None
        if hidden_states.shape[0] != sum(recv_splits):
            raise ValueError(f"combine: got {hidden_states.shape[0]} rows, the dispatch delivered {sum(recv_splits)}")
        back = self.communicator.all_to_allv(hidden_states, send_splits, recv_splits, kind="combine")
        per_pair = torch.zeros((n * top_k, *hidden_states.shape[1:]), dtype=back.dtype, device=back.device)
        per_pair[pairs] = back
        per_pair = per_pair.view(n, top_k, *hidden_states.shape[1:])
        w = weights.to(back.dtype).view(n, top_k, *([1] * (hidden_states.dim() - 1)))
        return (per_pair * w).sum(1)
