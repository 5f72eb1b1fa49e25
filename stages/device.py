"""Where and in what precision a stage runs: config names ("bfloat16", "cuda:1") -> torch dtype and device.

Every stage (and the Flux loader) resolves its ``dtype`` and ``device`` arguments here, so a bad value is one
:class:`~stages.errors.ConfigError` naming the field, the value and what is allowed, whichever stage loads first.
"""

from __future__ import annotations

import logging

import torch

from omni_runtime.stages.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_DEVICES = "'cpu', 'cuda', 'cuda:N'"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A config dtype name ("float32", "bfloat16", ...) or one of those torch dtypes -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype={dtype} is not supported; allowed: {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; allowed: {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """"cpu" or "cuda[:N]" (or a torch device) -> torch device; a CUDA device must exist on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a device; allowed: {_DEVICES}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r} is not supported; allowed: {_DEVICES}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={device!r} is not available: this machine has no CUDA device; "
                              f"allowed: 'cpu'")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device={device!r} is not available: this machine has {count} CUDA device(s); "
                              f"allowed: 'cpu', 'cuda:0' to 'cuda:{count - 1}'")
    return dev
