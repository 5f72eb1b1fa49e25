"""The GPU-kernel all2all managers of the reference (DeepEP), behind a guarded import. THEY HAVE NEVER RUN.

No machine this project runs on has the hardware (CUDA GPUs with NVLink / RDMA) or the library (``deep_ep``).
What is here:

* construction checks CUDA and the library first and raises :class:`All2AllBackendUnavailable`, one message
  naming what is missing and the CPU-capable backend to use instead (``alltoallv``: the same token movement as
  DeepEP's high-throughput kernels, on plain collectives);
* the ``deep_ep.Buffer`` arguments (``_make_all2all_kwargs``), unit-tested against hand-computed values;
* thin ``dispatch`` / ``combine`` wrappers over DeepEP's documented Python API, high-throughput
  (``Buffer.get_dispatch_layout``, ``dispatch``, ``combine``) and low-latency (``low_latency_dispatch``, whose
  expert-major layout ``MoEFeedForward`` consumes, ``low_latency_combine``), checked against a fake ``deep_ep``
  that implements that contract on plain collectives (tests/test_deepep_fake.py), never against the real kernels.

The FlashInfer and NIXL EP managers of the reference are not here (never written beyond their workspace sizes).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from omni_runtime.parallel.all2all.base import All2AllError, All2AllManagerBase

if TYPE_CHECKING:
    from omni_runtime.parallel.device_communicator import DeviceCommunicatorBase

logger = logging.getLogger(__name__)

#: vLLM's VLLM_DEEPEP_BUFFER_SIZE_MB default: the NVLink (and internode RDMA) buffer of DeepEP
DEEPEP_BUFFER_SIZE_MB = 1024
#: SMs DeepEP's high-throughput kernels use (vLLM's default)
DEEPEP_NUM_SMS = 20
#: DeepEP aligns every buffer to this many bytes
DEEPEP_BUFFER_ALIGNMENT = 128

class All2AllBackendUnavailable(All2AllError):
    """The chosen all2all backend needs hardware or a library this process does not have."""


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _require(backend: str, cls_name: str, module: str, package: str, device: torch.device | None) -> Any:
    """Import ``module`` if CUDA and the package are there; else raise the one clear error."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("CUDA (torch sees no GPU)")
    elif device is not None and device.type != "cuda":
        missing.append(f"a CUDA expert-parallel group (this group's device is {device})")
    lib = None
    try:
        lib = importlib.import_module(module)
    except ImportError:
        missing.append(f"the {package!r} package (import {module} failed)")
    if missing:
        raise All2AllBackendUnavailable(
            f"all2all_backend = {backend!r} ({cls_name}) needs CUDA GPUs and the {package!r} library; missing: "
            f"{'; '.join(missing)}. Use a CPU-capable backend instead: 'alltoallv' moves the same routed tokens "
            f"on plain collectives ('agrs' and 'naive' also run everywhere)")
    return lib


def low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                               num_experts: int) -> int:
    """Bytes of DeepEP's low-latency RDMA buffer (its ``LowLatencyLayout``, bf16 messages with per-128-channel
    scales, double-buffered send/recv/signal areas), rounded up as ``get_low_latency_rdma_size_hint`` does.

    Our transcription of the layout arithmetic; with ``deep_ep`` importable the library's own hint is used.
    """
    if hidden % 128 != 0:
        raise All2AllError(f"hidden = {hidden}: DeepEP's low-latency kernels need a hidden size divisible by 128")
    if num_experts % num_ranks != 0:
        raise All2AllError(f"num_experts = {num_experts} is not divisible by the {num_ranks} EP ranks")
    num_scales = hidden // 128
    dispatch_msg = 16 + max(hidden * 2, hidden + num_scales * 4)  # int4 header + bf16 or fp8+scales payload
    combine_msg = num_scales * 4 + hidden * 2
    t = num_max_dispatch_tokens_per_rank
    send = max(t * dispatch_msg, num_experts * t * combine_msg)
    recv = max(num_experts * t * dispatch_msg, num_experts * t * combine_msg)
    signaling = _align_up(num_experts * 4, 128)
    total = 2 * send + 2 * recv + 2 * signaling
    return (total + DEEPEP_BUFFER_ALIGNMENT) // DEEPEP_BUFFER_ALIGNMENT * DEEPEP_BUFFER_ALIGNMENT


class DeepEPAll2AllManagerBase(All2AllManagerBase):
    """Shared by the DeepEP managers: the library check and the ``deep_ep.Buffer`` handle cache."""

    backend = ""
    _package = "deep_ep"

    def __init__(self, communicator: DeviceCommunicatorBase, replica_groups: Sequence[Sequence[int]] | None = None,
                 num_experts: int | None = None, *, buffer_size_mb: int = DEEPEP_BUFFER_SIZE_MB,
                 internode: bool = False) -> None:
        self.deep_ep = _require(self.backend, type(self).__name__, "deep_ep", self._package, communicator.device)
        super().__init__(communicator, replica_groups, num_experts)
        self.buffer_size_mb = buffer_size_mb
        self.internode = internode
        self.handle_cache: dict[tuple, Any] = {}
        self._handle: Any = None

    def get_handle(self, kwargs: dict[str, Any]) -> Any:
        """One ``deep_ep.Buffer`` per distinct kwargs (as vLLM caches them)."""
        key = tuple(sorted((k, v) for k, v in kwargs.items() if k != "group"))
        if key not in self.handle_cache:
            self.handle_cache[key] = self.deep_ep.Buffer(**kwargs)
        return self.handle_cache[key]

    def _check_tokens(self, hidden_states: torch.Tensor, extras: list[torch.Tensor]) -> None:
        """What DeepEP's kernels take, as one clear error instead of a kernel assertion: bfloat16 tokens (its fp8
        input form is not used here), no extra per-token tensors."""
        if hidden_states.dtype != torch.bfloat16:
            raise All2AllError(f"{self.backend}: DeepEP's kernels take bfloat16 tokens, got {hidden_states.dtype}; "
                               f"set model.dtype = 'bfloat16' or use all2all_backend = 'alltoallv'")
        if extras:
            raise All2AllError(f"{self.backend}: extra_tensors are not supported by this wrapper")

    def destroy(self) -> None:
        self.handle_cache.clear()
        self._handle = None
        super().destroy()


class DeepEPHTAll2AllManager(DeepEPAll2AllManagerBase):
    """DeepEP high-throughput kernels (NVLink intranode, RDMA internode). Unverified: never ran here."""

    backend = "deepep_high_throughput"

    @staticmethod
    def _make_all2all_kwargs(internode: bool = False, buffer_size_mb: int = DEEPEP_BUFFER_SIZE_MB,
                             num_sms: int = DEEPEP_NUM_SMS, group: Any = None) -> dict[str, Any]:
        """``deep_ep.Buffer`` kwargs: an NVLink buffer of ``buffer_size_mb``; internode also an RDMA buffer of the
        same size and ``num_sms // 2`` queue pairs per rank; intranode no RDMA and one QP."""
        num_nvl_bytes = buffer_size_mb * 1024 * 1024
        if internode:
            num_rdma_bytes, num_qps_per_rank = buffer_size_mb * 1024 * 1024, num_sms // 2
        else:
            num_rdma_bytes, num_qps_per_rank = 0, 1
        return dict(group=group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes,
                    low_latency_mode=False, num_qps_per_rank=num_qps_per_rank)

    def _buffer(self) -> Any:
        if self._handle is None:
            self._handle = self.get_handle(self._make_all2all_kwargs(self.internode, self.buffer_size_mb,
                                                                     group=self.communicator.device_group))
        return self._handle

    def _dispatch(self, hidden_states, topk_weights, topk_ids, extras):
        self._check_tokens(hidden_states, extras)
        buf = self._buffer()
        idx = topk_ids.to(torch.int64)
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, self.num_experts)
        recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
            hidden_states, topk_idx=idx, topk_weights=topk_weights.float(), num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        self._ctx = handle
        # DeepEP returns local expert indices (-1 elsewhere); the MoE layer expects global ids
        start = self.rank * self.experts_per_rank
        recv_ids = torch.where(recv_idx >= 0, recv_idx + start, recv_idx)
        return recv_x, recv_w.to(topk_weights.dtype), recv_ids.to(topk_ids.dtype), []

    def _combine(self, hidden_states):
        combined, _, _ = self._buffer().combine(hidden_states, self._ctx)
        self._ctx = None
        return combined


class DeepEPLLAll2AllManager(DeepEPAll2AllManagerBase):
    """DeepEP low-latency kernels (RDMA/NVLink, CUDA-graph friendly). Never ran on the real kernels.

    Unlike the other managers its ``dispatch`` returns DeepEP's expert-major layout, not per-token rows:
    ``(recv_x (local experts, max tokens x ranks, hidden), recv_count (local experts,), topk_ids)``, of which the
    first ``recv_count[i]`` rows of ``recv_x[i]`` are valid; ``combine`` takes the experts' outputs in that layout
    and applies the top-k weights. ``expert_major`` tells ``MoEFeedForward`` to run each local expert on its rows.
    """

    backend = "deepep_low_latency"
    expert_major = True

    def __init__(self, communicator: DeviceCommunicatorBase, replica_groups: Sequence[Sequence[int]] | None = None,
                 num_experts: int | None = None, *, max_num_tokens_per_dp_rank: int = 8192,
                 buffer_size_mb: int = DEEPEP_BUFFER_SIZE_MB, internode: bool = False) -> None:
        super().__init__(communicator, replica_groups, num_experts, buffer_size_mb=buffer_size_mb,
                         internode=internode)
        self.max_num_tokens_per_dp_rank = max_num_tokens_per_dp_rank

    @staticmethod
    def _make_all2all_kwargs(max_num_tokens_per_dp_rank: int, token_hidden_size: int, num_ep_ranks: int,
                             num_global_experts: int, num_local_experts: int, *,
                             buffer_size_mb: int = DEEPEP_BUFFER_SIZE_MB, group: Any = None,
                             deep_ep: Any = None) -> dict[str, Any]:
        """``deep_ep.Buffer`` kwargs for low-latency mode: one QP per local expert and an RDMA buffer sized by
        :func:`low_latency_rdma_size_hint` (or the library's hint when ``deep_ep`` is given)."""
        if num_global_experts != num_local_experts * num_ep_ranks:
            raise All2AllError(f"num_global_experts = {num_global_experts} must equal num_local_experts "
                               f"{num_local_experts} x num_ep_ranks {num_ep_ranks}")
        hint = (deep_ep.Buffer.get_low_latency_rdma_size_hint if deep_ep is not None
                else low_latency_rdma_size_hint)
        num_rdma_bytes = hint(max_num_tokens_per_dp_rank, token_hidden_size, num_ep_ranks, num_global_experts)
        return dict(group=group, num_nvl_bytes=buffer_size_mb * 1024 * 1024, num_rdma_bytes=num_rdma_bytes,
                    low_latency_mode=True, num_qps_per_rank=num_local_experts,
                    allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False)

    def _buffer(self, hidden: int) -> Any:
        if self._handle is None:
            self._handle = self.get_handle(self._make_all2all_kwargs(
                self.max_num_tokens_per_dp_rank, hidden, self.world_size, self.num_experts, self.experts_per_rank,
                buffer_size_mb=self.buffer_size_mb, group=self.communicator.device_group, deep_ep=self.deep_ep))
        return self._handle

    def _dispatch(self, hidden_states, topk_weights, topk_ids, extras):
        self._check_tokens(hidden_states, extras)
        if hidden_states.shape[0] > self.max_num_tokens_per_dp_rank:
            raise All2AllError(f"deepep_low_latency: {hidden_states.shape[0]} tokens on this rank, the buffer holds "
                               f"{self.max_num_tokens_per_dp_rank} (max_num_tokens_per_dp_rank); use "
                               f"'deepep_high_throughput' for batches this large")
        buf = self._buffer(hidden_states.shape[1])
        idx = topk_ids.to(torch.int64)
        recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(
            hidden_states, idx, self.max_num_tokens_per_dp_rank, self.num_experts, use_fp8=False)
        self._ctx = (handle, idx, topk_weights)
        # (local experts, max tokens, hidden) expert-major layout; counts say how many rows are valid
        return recv_x, recv_count, idx, []

    def _combine(self, hidden_states):
        handle, idx, weights = self._ctx
        self._ctx = None
        combined, _, _ = self._buffer(hidden_states.shape[-1]).low_latency_combine(
            hidden_states, idx, weights.float(), handle)
        return combined
