"""msgspec/msgpack encoding of our messages, with tensors and arrays as zero-copy frames.

Wire format
-----------
``encode(obj)`` returns a list of frames: frame 0 is the msgpack body, frames 1.. are the raw
bytes of tensors and numpy arrays (out-of-band). Inside the body every tensor/array is a msgpack
Ext value (code 1 = ``torch.Tensor``, code 2 = ``numpy.ndarray``) whose payload is itself a small
msgpack array ``[meta, data]`` (``meta`` a
:class:`comm.tensor_meta.TensorMeta`, ``[dtype_name, shape]``); ``data`` is either the index of an out-of-band frame
or, for tensors smaller than :data:`INLINE_MAX_BYTES`, the bytes themselves. Because they are Ext
values they round-trip anywhere: as fields of Structs annotated ``torch.Tensor``/``np.ndarray``,
inside dicts and lists, or untyped (``type=Any``).

Copies
------
- Send side: a contiguous CPU tensor becomes a ``memoryview`` of its own storage (through a
  ``uint8`` view, so bfloat16/float8/complex32 need no numpy support). Non-contiguous, conjugate
  or negative-bit views and non-CPU tensors are copied once (unavoidable); a contiguous tensor is
  never copied.
- Receive side: decoded tensors/arrays are views of the received frames (``torch.frombuffer`` /
  ``np.frombuffer``). They keep their frame alive. The one exception: a tensor whose bytes are not
  aligned to its element size (16 at most) is copied, since torch kernels may assume alignment. A tensor decoded from a read-only frame
  (``bytes``, a ZMQ frame) must be treated as read-only; pass a ``bytearray`` to get a writable one.

``encode_to_bytes``/``decode_from_bytes`` wrap the same frames into one buffer: a header
``b"OMS1" | u32 n | u64 len * n`` followed by the frames, each starting at a 64-byte aligned offset.
Decoding from a buffer is zero-copy too: tensors are views of that buffer.

Safety
------
Decoding untrusted input can only fail, never execute: no pickle, dtypes come from an allow-list
of names, shapes are validated against the actual byte counts (so a declared size never causes an
allocation), frame indices are bounds-checked. Any failure raises :class:`SerdeError`.
"""

from __future__ import annotations

import builtins
import logging
import struct
import threading
import warnings
from functools import lru_cache
from typing import Any

import msgspec
import numpy as np
import torch

from omni_runtime.comm.dtypes import TORCH_DTYPES as _DTYPES
from omni_runtime.comm.tensor_meta import TensorMeta

logger = logging.getLogger(__name__)

__all__ = [
    "INLINE_MAX_BYTES",
    "SerdeError",
    "decode",
    "decode_from_bytes",
    "encode",
    "encode_to_bytes",
]

INLINE_MAX_BYTES = 256
"""Tensors/arrays with fewer bytes than this are carried inside the body instead of a frame."""

EXT_TORCH = 1
EXT_NUMPY = 2

_MAGIC = b"OMS1"
_ALIGN = 64
_MAX_FRAMES = 1 << 20


class SerdeError(ValueError):
    """Bytes that cannot be decoded (malformed, hostile, or of the wrong type), or an object
    that cannot be encoded."""


TORCH_DTYPES: dict[str, torch.dtype] = _DTYPES
"""Allow-list of tensor dtypes that travel on the wire: :data:`comm.dtypes.TORCH_DTYPES`."""
_TORCH_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in [
        "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    ]
}
"""Allow-list of numpy dtypes (native byte order) that travel on the wire."""


# ----------------------------------------------------------------------------- encoding


_payload_encoder = msgspec.msgpack.Encoder()


def _add_buffer(raw: memoryview) -> int | bytes:
    """Inline ``raw`` when small, else append it as an out-of-band frame and return its index."""
    if raw.nbytes < INLINE_MAX_BYTES:
        return raw.tobytes()
    frames = _enc_state.frames
    if frames is None:  # pragma: no cover - only reachable by calling the hook directly
        raise SerdeError("tensor encoded outside of serde.encode")
    frames.append(raw)
    return len(frames)  # frame 0 is the body


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Flat ``uint8`` memoryview of a tensor's data; no copy when it is a contiguous CPU tensor."""
    if t.layout != torch.strided:
        raise SerdeError(f"tensor layout {t.layout} cannot be sent; only torch.strided is allowed")
    if t.dtype not in _TORCH_DTYPE_NAMES:
        raise SerdeError(f"tensor dtype {t.dtype} cannot be sent; allowed: {sorted(TORCH_DTYPES)}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def array_bytes(a: np.ndarray) -> tuple[np.ndarray, memoryview]:
    """Native-order, C-contiguous form of ``a`` and a flat byte memoryview of it (no copy if possible)."""
    if a.dtype.name not in NUMPY_DTYPES or a.dtype.hasobject or a.dtype.fields is not None:
        raise SerdeError(f"numpy dtype {a.dtype} cannot be sent; allowed: {sorted(NUMPY_DTYPES)}")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    if a.size == 0:
        return a, memoryview(b"")
    return a, memoryview(a.reshape(-1).view(np.uint8))


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        name = _TORCH_DTYPE_NAMES.get(obj.dtype)
        raw = tensor_bytes(obj)
        payload = (TensorMeta(name, tuple(obj.shape)), _add_buffer(raw))
        return msgspec.msgpack.Ext(EXT_TORCH, _payload_encoder.encode(payload))
    if isinstance(obj, np.ndarray):
        a, raw = array_bytes(obj)
        payload = (TensorMeta(a.dtype.name, tuple(a.shape)), _add_buffer(raw))
        return msgspec.msgpack.Ext(EXT_NUMPY, _payload_encoder.encode(payload))
    if isinstance(obj, torch.dtype):
        name = _TORCH_DTYPE_NAMES.get(obj)
        if name is None:
            raise SerdeError(f"torch dtype {obj} cannot be sent; allowed: {sorted(TORCH_DTYPES)}")
        return name
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"objects of type {type(obj).__name__} cannot be encoded")


class _EncodeState(threading.local):
    def __init__(self) -> None:
        self.frames: list[memoryview] | None = None
        self.encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


_enc_state = _EncodeState()


def encode(obj: Any) -> list[bytes | memoryview]:
    """Encode ``obj`` into frames: ``[body, buffer1, buffer2, ...]``.

    The buffers are memoryviews of the tensors' own storage where possible; they keep it alive.
    Do not mutate the tensors until the frames have been sent.
    """
    state = _enc_state
    outer = state.frames
    frames: list[memoryview] = []
    state.frames = frames
    try:
        body = state.encoder.encode(obj)
    except SerdeError:
        raise
    except (TypeError, ValueError, NotImplementedError, OverflowError, RecursionError) as e:
        raise SerdeError(f"cannot encode object of type {type(obj).__name__}: {e}") from e
    finally:
        state.frames = outer
    return [body, *frames]


def _padding(n: int) -> int:
    return -n % _ALIGN


def encode_to_bytes(obj: Any) -> bytes:
    """Encode ``obj`` into one buffer (header + frames, each frame 64-byte aligned)."""
    frames = encode(obj)
    lengths = [memoryview(f).nbytes for f in frames]
    header = _MAGIC + struct.pack(f"<I{len(frames)}Q", len(frames), *lengths)
    parts: list[bytes | memoryview] = [header, bytes(_padding(len(header)))]
    for f, n in zip(frames, lengths, strict=True):
        parts.append(f)
        parts.append(bytes(_padding(n)))
    return b"".join(parts)


# ----------------------------------------------------------------------------- decoding


class _DecodeState(threading.local):
    def __init__(self) -> None:
        self.frames: list[memoryview] | None = None


_dec_state = _DecodeState()

_payload_decoder = msgspec.msgpack.Decoder(tuple[TensorMeta, int | bytes])


def _decode_header(data: memoryview, kind: str, dtypes: dict[str, Any]) -> tuple[Any, list[int], int, memoryview]:
    """Validate a tensor/array Ext payload: its dtype (from ``dtypes``), shape and buffer.

    Returns ``(dtype, shape, numel, raw)`` where ``raw`` holds exactly ``numel`` elements' bytes.
    """
    try:
        meta, ref = _payload_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise SerdeError(f"malformed {kind} header (expected [[dtype, shape], frame or bytes]): {e}") from e
    try:
        meta.validate(dtypes)
    except ValueError as e:
        raise SerdeError(f"{kind} {e}") from None
    dtype = dtypes[meta.dtype]
    shape = list(meta.shape)
    numel = meta.numel
    return dtype, shape, numel, _buffer_for(ref, numel * dtype.itemsize)


def _buffer_for(data: int | bytes, nbytes: int) -> memoryview:
    if isinstance(data, bytes):
        raw = memoryview(bytearray(data))  # small inline copy, writable
    else:
        frames = _dec_state.frames
        if frames is None or not 1 <= data < len(frames):
            n = 0 if frames is None else len(frames)
            raise SerdeError(f"tensor refers to frame {data}, but only frames 1..{n - 1} exist")
        raw = frames[data]
    if raw.nbytes != nbytes:
        raise SerdeError(f"tensor needs {nbytes} bytes but its buffer holds {raw.nbytes}")
    return raw


def _decode_tensor(data: memoryview) -> torch.Tensor:
    dtype, shape, numel, raw = _decode_header(data, "tensor", TORCH_DTYPES)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if raw.readonly:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            u8 = torch.frombuffer(raw, dtype=torch.uint8)
    else:
        u8 = torch.frombuffer(raw, dtype=torch.uint8)
    if dtype == torch.bool and bool((u8 > 1).any()):
        raise SerdeError("bool tensor holds bytes other than 0 and 1")
    if u8.data_ptr() % min(dtype.itemsize, 16):
        # torch kernels may assume element alignment; a misaligned buffer (a sliced memoryview, or
        # complex128 in an 8-byte aligned ZMQ frame) is copied once instead of viewed
        u8 = u8.clone()
    return u8.view(dtype).view(shape)


def _decode_array(data: memoryview) -> np.ndarray:
    dtype, shape, numel, raw = _decode_header(data, "array", NUMPY_DTYPES)
    if numel == 0:
        return np.empty(shape, dtype=dtype)
    arr = np.frombuffer(raw, dtype=np.uint8)
    if dtype == np.bool_ and bool((arr > 1).any()):
        raise SerdeError("bool array holds bytes other than 0 and 1")
    return arr.view(dtype).reshape(shape)


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == EXT_TORCH:
        return _decode_tensor(data)
    if code == EXT_NUMPY:
        return _decode_array(data)
    raise SerdeError(f"unknown msgpack ext code {code}; allowed: {EXT_TORCH} (tensor), {EXT_NUMPY} (ndarray)")


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is torch.Tensor:
        if isinstance(obj, torch.Tensor):
            return obj
        raise ValueError(f"expected a tensor, got {type(obj).__name__}")
    if typ is np.ndarray:
        if isinstance(obj, np.ndarray):
            return obj
        raise ValueError(f"expected a numpy array, got {type(obj).__name__}")
    if typ is torch.dtype:
        if isinstance(obj, str) and obj in TORCH_DTYPES:
            return TORCH_DTYPES[obj]
        raise ValueError(f"torch dtype {obj!r} is not allowed; allowed: {sorted(TORCH_DTYPES)}")
    raise NotImplementedError(f"cannot decode type {typ!r}")


@lru_cache(maxsize=256)
def _decoder(typ: Any) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(typ, ext_hook=_ext_hook, dec_hook=_dec_hook)


def _as_bytes_view(frame: Any, i: int) -> memoryview:
    try:
        mv = memoryview(frame)
    except TypeError as e:
        raise SerdeError(f"frame {i} of type {type(frame).__name__} is not a buffer") from e
    if mv.ndim != 1 or mv.format != "B":
        if not mv.c_contiguous:
            raise SerdeError(f"frame {i} is not a contiguous buffer")
        mv = mv.cast("B")
    return mv


def decode(frames: list[Any] | tuple[Any, ...], type: Any = Any) -> Any:  # noqa: A002 (mirrors msgspec)
    """Decode frames made by :func:`encode` into ``type``; tensors are views of the frames.

    Frames may be ``bytes``, ``bytearray``, ``memoryview``, ZMQ frames, or anything with the
    buffer protocol. Raises :class:`SerdeError` for anything malformed.
    """
    if not isinstance(frames, (list, tuple)) or not frames:
        raise SerdeError(f"expected a non-empty list of frames, got {builtins.type(frames).__name__}")
    views = [_as_bytes_view(f, i) for i, f in enumerate(frames)]
    try:
        decoder = _decoder(type)
    except TypeError as e:
        raise SerdeError(f"cannot decode into type {type!r}: {e}") from e
    state = _dec_state
    outer = state.frames
    state.frames = views
    try:
        return decoder.decode(views[0])
    except SerdeError:
        raise
    except msgspec.ValidationError as e:
        raise SerdeError(f"message does not match {getattr(type, '__name__', type)}: {e}") from e
    except Exception as e:  # anything else hostile input can provoke (RecursionError, MemoryError, ...)
        raise SerdeError(f"malformed message: {builtins.type(e).__name__}: {e}") from e
    finally:
        state.frames = outer


def decode_from_bytes(buf: bytes | bytearray | memoryview, type: Any = Any) -> Any:  # noqa: A002
    """Decode a buffer made by :func:`encode_to_bytes`; tensors are views of ``buf``."""
    mv = _as_bytes_view(buf, 0)
    total = mv.nbytes
    if total < 8 or mv[:4] != _MAGIC:
        raise SerdeError("buffer does not start with the serde header b'OMS1'")
    (n,) = struct.unpack_from("<I", mv, 4)
    if not 1 <= n <= _MAX_FRAMES or 8 + 8 * n > total:
        raise SerdeError(f"buffer header declares {n} frames, which does not fit a {total}-byte buffer")
    lengths = struct.unpack_from(f"<{n}Q", mv, 8)
    pos = 8 + 8 * n
    pos += _padding(pos)
    frames = []
    for i, length in enumerate(lengths):
        end = pos + length
        if end > total:
            raise SerdeError(f"frame {i} of {length} bytes runs past the end of the {total}-byte buffer")
        frames.append(mv[pos:end])
        pos = end + _padding(length)
    return decode(frames, type)
