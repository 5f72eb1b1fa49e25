"""The one description of a tensor without its bytes: dtype name, shape, device type.

Used wherever a receiver must know a tensor before (or besides) its bytes: the serde header of a tensor frame,
each tensor slot of a shared-memory handle, the group coordinator's tensor-dict metadata and the frame
transport's remote references. The dtype is a wire name from :mod:`comm.dtypes` (an allow-list).
"""

from __future__ import annotations

import logging
import math

import msgspec
import torch

from omni_runtime.comm.dtypes import dtype_from_name, dtype_name

logger = logging.getLogger(__name__)

__all__ = ["MAX_DIM", "MAX_NDIM", "TensorMeta"]

MAX_NDIM = 64
MAX_DIM = 1 << 48


class TensorMeta(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """``dtype`` (wire name), ``shape`` and ``device_type`` ("cpu" unless the tensor lives on a device)."""

    dtype: str
    shape: tuple[int, ...]
    device_type: str = "cpu"

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorMeta:
        """The meta of tensor ``t``; raises ``ValueError`` for a dtype that may not travel."""
        return cls(dtype_name(t.dtype), tuple(t.shape), t.device.type)

    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype().itemsize

    def validate(self, dtypes: object = None) -> None:
        """Raise ``ValueError`` naming the field when the meta is not well formed (untrusted input).

        ``dtypes`` is the allow-list of names (default: :data:`comm.dtypes.TORCH_DTYPES`)."""
        if dtypes is None:
            self.torch_dtype()
        elif self.dtype not in dtypes:  # type: ignore[operator]
            raise ValueError(f"dtype {self.dtype!r} is not allowed; allowed: {sorted(dtypes)}")  # type: ignore[call-overload]
        if len(self.shape) > MAX_NDIM:
            raise ValueError(f"shape has {len(self.shape)} dimensions; at most {MAX_NDIM} are allowed")
        for d in self.shape:
            if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < MAX_DIM:
                raise ValueError(f"shape={list(self.shape)!r}: dimension {d!r} out of range [0, {MAX_DIM})")
