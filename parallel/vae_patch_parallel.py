"""Exact VAE patch parallelism: an image's rows split across the ranks of one patch group.

Every rank holds a contiguous band of rows (:func:`vae_row_ranges`) of every activation, for the whole batch.

- A convolution with a ``k x k`` kernel (stride 1, zero padding ``k // 2``) first receives ``k // 2`` halo rows
  from each neighbour (p2p through the group: ``GroupCoordinator.send`` / ``recv``), pads only the image's true
  top and bottom with zeros, and convolves: the same numbers as the unsplit conv.
- GroupNorm reduces its statistics over the whole image: the fp32 sum per (image, group) is all-reduced, then the
  fp32 sum of squared deviations from that global mean (two small all-reduces; no E[x²] - E[x]² cancellation).
- Self-attention runs through the project's sequence-parallel attention (``parallel.attention.sp_attention``
  with an explicit ``SPMesh`` whose sp and ring groups are the patch group: Ring attention, K/V passed around by
  the group communicator's batched p2p; uneven shards are padded and masked there).
- The output rows are gathered to group rank 0.

Nearest 2x upsampling is local: a band ``[a, b)`` becomes ``[2a, 2b)``. Everything takes the group explicitly
(a ``GroupCoordinator``, in the stage processes ``mesh.group("vae_patch")`` of the replica's ``parallel.mesh.Mesh``)
and every byte goes through that group's ``DeviceCommunicatorBase`` (send/recv, all_reduce, gather, batched p2p);
nothing here reads global state. :class:`PatchStats` counts what the decode exchanged (the communicator's own
``CommStats`` count the bytes by kind).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from omni_runtime.parallel.attention import SPMesh, sp_attention
from omni_runtime.parallel.group_coordinator import GroupCoordinator
from omni_runtime.parallel.utils import balanced_ranges

logger = logging.getLogger(__name__)


class VaePatchError(ValueError):
    """A patch-parallel decode that cannot run as asked (names the value and what is allowed)."""


def vae_row_ranges(latent_rows: int, patch: int) -> list[tuple[int, int]]:
    """``[start, end)`` latent rows of each of ``patch`` ranks: contiguous, balanced, earlier ranks take the extra
    row (so the last ranks take fewer). With fewer rows than ranks the trailing ranges are empty."""
    if latent_rows < 1:
        raise VaePatchError(f"latent_rows = {latent_rows}: must be >= 1")
    if patch < 1:
        raise VaePatchError(f"patch = {patch}: must be >= 1")
    return balanced_ranges(latent_rows, patch)


@dataclass
class PatchStats:
    """What one rank exchanged during the decodes since the last :meth:`reset`."""

    halo_bytes_sent: int = 0
    halo_exchanges: int = 0      # convolutions with a halo (k > 1)
    norm_all_reduces: int = 0
    norm_all_reduce_bytes: int = 0
    gather_bytes: int = 0
    per_conv_halo_bytes: list[int] = field(default_factory=list)
    per_conv_input_bytes: list[int] = field(default_factory=list)  # this rank's band, for the same convs

    def reset(self) -> None:
        self.halo_bytes_sent = self.halo_exchanges = self.norm_all_reduces = 0
        self.norm_all_reduce_bytes = self.gather_bytes = 0
        self.per_conv_halo_bytes.clear()
        self.per_conv_input_bytes.clear()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class PatchGroup:
    """The patch-parallel operations of one rank over ``group`` (a ``GroupCoordinator``: ``mesh.group("vae_patch")``).
    With a group of one rank every operation is the plain local one."""

    def __init__(self, group: GroupCoordinator, stats: PatchStats | None = None) -> None:
        self.group = group
        self.world_size = int(group.world_size)
        self.rank = int(group.rank_in_group)
        self.stats = stats if stats is not None else PatchStats()
        self._mesh: SPMesh | None = None

    # ------------------------------------------------------------------ halo exchange + conv
    def exchange_halo(self, x: torch.Tensor, halo: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(rows above from the previous rank, rows below from the next rank), ``None`` at the image edges.

        Blocking send/recv, ordered by rank parity so that no two neighbours both send first."""
        if self.world_size == 1 or halo == 0:
            return None, None
        if x.shape[2] < halo:
            raise VaePatchError(f"rank {self.rank} holds {x.shape[2]} rows but a halo of {halo} rows is needed")
        has_prev, has_next = self.rank > 0, self.rank < self.world_size - 1
        shape = (x.shape[0], x.shape[1], halo, x.shape[3])
        bottom_rows = x[:, :, -halo:].contiguous()   # goes down to the next rank
        top_rows = x[:, :, :halo].contiguous()       # goes up to the previous rank
        above = below = None
        even = self.rank % 2 == 0
        # phase 1: rows travel down (send to next, receive from previous)
        # phase 2: rows travel up (send to previous, receive from next)
        for phase in (0, 1):
            send_to = (self.rank + 1) if phase == 0 else (self.rank - 1)
            recv_from = (self.rank - 1) if phase == 0 else (self.rank + 1)
            do_send = has_next if phase == 0 else has_prev
            do_recv = has_prev if phase == 0 else has_next
            payload = bottom_rows if phase == 0 else top_rows
            steps = ("send", "recv") if even else ("recv", "send")
            for step in steps:
                if step == "send" and do_send:
                    self.group.send(payload, dst=send_to)
                    self.stats.halo_bytes_sent += _nbytes(payload)
                elif step == "recv" and do_recv:
                    got = self.group.recv(torch.Size(shape), x.dtype, src=recv_from).to(x.device)
                    if phase == 0:
                        above = got
                    else:
                        below = got
        return above, below

    def conv2d(self, x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
        """``conv(x)`` on a band of rows: the result equals the same rows of ``conv`` applied to the whole image."""
        kh, kw = conv.kernel_size
        ph, pw = conv.padding if isinstance(conv.padding, tuple) else (None, None)
        if (conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"
                or kh % 2 == 0 or ph != kh // 2 or pw != kw // 2):
            raise VaePatchError(f"patch-parallel conv supports stride 1, odd kernels with 'same' zero padding; got "
                                f"kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}, "
                                f"dilation {conv.dilation}, groups {conv.groups}, mode {conv.padding_mode}")
        if self.world_size == 1 or ph == 0:
            return conv(x)
        sent_before = self.stats.halo_bytes_sent
        above, below = self.exchange_halo(x, ph)
        self.stats.halo_exchanges += 1
        self.stats.per_conv_halo_bytes.append(self.stats.halo_bytes_sent - sent_before)
        self.stats.per_conv_input_bytes.append(_nbytes(x))
        # the interior rows need no halo: convolve the band as it is (zero rows where the halo goes), then redo
        # the ph edge rows on each side that a neighbour's rows reach, from a thin window (no copy of the band)
        if x.shape[2] < 2 * ph:  # a band thinner than the edge windows: pad it whole (it is small)
            zeros = x.new_zeros(x.shape[0], x.shape[1], ph, x.shape[3])
            x = torch.cat([zeros if above is None else above, x, zeros if below is None else below], dim=2)
            return F.conv2d(x, conv.weight, conv.bias, stride=1, padding=(0, pw))
        out = F.conv2d(x, conv.weight, conv.bias, stride=1, padding=(ph, pw))
        if above is not None:
            window = torch.cat([above, x[:, :, :2 * ph]], dim=2)
            out[:, :, :ph] = F.conv2d(window, conv.weight, conv.bias, stride=1, padding=(0, pw))[:, :, :ph]
        if below is not None:
            window = torch.cat([x[:, :, -2 * ph:], below], dim=2)
            out[:, :, -ph:] = F.conv2d(window, conv.weight, conv.bias, stride=1, padding=(0, pw))[:, :, -ph:]
        return out

    # ------------------------------------------------------------------ GroupNorm
    def _sum_over_group(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        self.stats.norm_all_reduces += 1
        self.stats.norm_all_reduce_bytes += _nbytes(t)
        return self.group.all_reduce(t)

    def group_norm(self, x: torch.Tensor, norm: torch.nn.GroupNorm, total_rows: int) -> torch.Tensor:
        """``norm(x)`` with statistics over the whole image (``total_rows`` rows summed over the ranks).

        fp32 statistics: all-reduce of the per-(image, group) sums, then of the squared deviations from the
        global mean. The normalization itself is local."""
        b, c, h, w = x.shape
        g = norm.num_groups
        if c != norm.num_channels:
            raise VaePatchError(f"group_norm: input has {c} channels, the GroupNorm expects {norm.num_channels}")
        if self.world_size == 1:
            return norm(x)
        count = (c // g) * total_rows * w
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        # one group at a time: the temporaries are 1/g of the band, never a full fp32 copy of it
        xg = x.reshape(b, g, -1)
        sums = torch.stack([xg[:, i].sum(dim=1, dtype=acc) for i in range(g)], dim=1)
        mean = self._sum_over_group(sums) / count
        m2 = torch.stack([(xg[:, i].to(acc) - mean[:, i, None]).square_().sum(dim=1) for i in range(g)], dim=1)
        var = self._sum_over_group(m2) / count
        # like torch's own kernel: y = x * scale + shift with per-(image, channel) scale and shift
        scale = torch.rsqrt(var + norm.eps).repeat_interleave(c // g, dim=1)
        shift = -mean.repeat_interleave(c // g, dim=1) * scale
        if norm.affine:
            scale = scale * norm.weight.to(acc)
            shift = shift * norm.weight.to(acc) + norm.bias.to(acc)
        y = torch.addcmul(shift[:, :, None, None], x.to(acc), scale[:, :, None, None])
        return y.to(x.dtype)

    # ------------------------------------------------------------------ attention
    def sp_mesh(self) -> SPMesh:
        """The attention's view of the patch group: sequence-parallel over all of it, as Ring (the Ulysses side is
        a group of this rank alone), fp32 merging of the partial results."""
        if self._mesh is None:
            solo = GroupCoordinator.single(self.group.rank, group_name="vae_patch_ulysses")
            self._mesh = SPMesh(sp=self.group, ulysses=solo, ring=self.group, convert_to_fp32=True)
        return self._mesh

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Self-attention of this rank's queries over every rank's keys: (batch, local_seq, heads, head_dim)."""
        if self.world_size == 1:
            return sp_attention(q, k, v, scale=scale, local=True)
        return sp_attention(q, k, v, scale=scale, mesh=self.sp_mesh())

    # ------------------------------------------------------------------ gather
    def gather_rows(self, x: torch.Tensor, rows: list[tuple[int, int]], dst: int = 0) -> torch.Tensor | None:
        """Concatenate every rank's band (``rows[r]`` are rank r's ``[start, end)``) along dim 2 on group rank
        ``dst``; ``None`` elsewhere. Bands of different heights are padded for the collective and cropped."""
        if self.world_size == 1:
            return x
        counts = [e - s for s, e in rows]
        if x.shape[2] != counts[self.rank]:
            raise VaePatchError(f"gather_rows: rank {self.rank} has {x.shape[2]} rows, the split says "
                                f"{counts[self.rank]}")
        top = max(counts)
        if x.shape[2] < top:
            x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], top - x.shape[2], x.shape[3])], dim=2)
        x = x.contiguous()
        if self.rank != dst:
            self.stats.gather_bytes += _nbytes(x)
        full = self.group.gather(x, dst=dst, dim=2)
        if full is None:
            return None
        parts = [full[:, :, r * top: r * top + n] for r, n in enumerate(counts)]
        return torch.cat(parts, dim=2)

