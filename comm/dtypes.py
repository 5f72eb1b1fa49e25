"""The one table of tensor dtypes that may cross a process boundary, by wire name.

Every wire format of ours (serde frames, shm handles, the group coordinator's tensor-dict metadata) names a
dtype by the string here (``str(dtype)`` without ``torch.``) and looks it up in this allow-list; an unknown
name is an error, never a ``getattr`` on torch.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["TORCH_DTYPES", "dtype_from_name", "dtype_name"]

_NAMES = (
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
)

TORCH_DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
"""Wire name -> torch dtype, for every dtype this torch build has."""

_BY_DTYPE: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``; raises ``ValueError`` for a dtype that may not travel."""
    name = _BY_DTYPE.get(dtype)
    if name is None:
        raise ValueError(f"tensor dtype {dtype} cannot be sent; allowed: {sorted(TORCH_DTYPES)}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype of wire name ``name``; raises ``ValueError`` for a name not in the allow-list."""
    dtype = TORCH_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"tensor dtype {name!r} is not allowed; allowed: {sorted(TORCH_DTYPES)}")
    return dtype
