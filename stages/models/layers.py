"""Building blocks the DiT families share (Flux, Qwen-Image, Wan): rotary embeddings, the timestep's sinusoidal
embedding, embedders, feed-forward, the output norm and the joint (text + image) attention.

Parameter names follow diffusers (``linear_1``, ``net.0.proj``, ``to_q``, ``add_q_proj``, ...) so each family's
checkpoint loads as it is. Attention goes through ``parallel.attention.Attention``: local until a strategy binds a
mesh into it; no module here reads global state or does rank arithmetic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from omni_runtime.parallel.attention import Attention
from omni_runtime.stages.cpu_linear import linear_gelu_tanh

logger = logging.getLogger(__name__)

ROPE_THETA = 10000
TIME_CHANNELS = 256  # the sinusoidal timestep embedding's width (diffusers' ``Timesteps(256, ...)``)

# ----------------------------------------------------------------------------------------------------------------
# rotary position embedding


def rope(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: int = ROPE_THETA, *,
         dtype: torch.dtype = torch.float64, polar: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (seq, sum(axes_dims)) float32, for position ids (seq, n_axes); the interleaved layout
    (each angle repeated for the pair (2i, 2i+1)). Per-row ids (rows, seq, n_axes) give (rows, seq, sum(axes_dims)).

    ``dtype``: what the angles ``position * theta ** (-2i / dim)`` are computed in, the family's choice: Flux float64
    (float32 on mps, which has no float64), Qwen-Image float32. ``polar=True`` evaluates cos/sin through
    ``torch.polar`` as diffusers' Qwen rope tables do (its float32 values may differ from ``torch.cos``'s by an ulp).
    """
    if dtype == torch.float64 and ids.device.type == "mps":
        dtype = torch.float32
    pos = ids.to(dtype)
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=pos.dtype, device=ids.device) / dim))
        angles = pos[..., axis, None] * freqs
        if polar:
            unit = torch.polar(torch.ones_like(angles), angles)
            cos, sin = unit.real, unit.imag
        else:
            cos, sin = angles.cos(), angles.sin()
        cos_parts.append(cos.repeat_interleave(2, dim=-1).float())
        sin_parts.append(sin.repeat_interleave(2, dim=-1).float())
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def apply_rope(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate (batch, seq, heads, head_dim) pairs (2i, 2i+1) by the angles in ``freqs``: (seq, head_dim), shared by
    every row, or (batch, seq, head_dim), one per row. Computed in float32 (as diffusers does), cast back."""
    cos, sin = ((f[None, :, None, :] if f.dim() == 2 else f[:, :, None, :]).to(x.device) for f in freqs)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# embedders, norms, feed-forward


def timestep_embedding(t: torch.Tensor, channels: int = TIME_CHANNELS, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (cos first, then sin), float32, of a 1-D tensor of (fractional) timesteps on the scale
    the model takes them (diffusers' ``Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)``)."""
    half = channels // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear → SiLU → Linear (``linear_1`` / ``linear_2`` in the checkpoint)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaNormOut(nn.Module):
    """Final norm: the projection yields (scale, shift), in that order (diffusers' ``AdaLayerNormContinuous``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return _modulate(self.norm(x), shift, scale)


class RMSNorm(nn.Module):
    """RMS norm as diffusers' ``normalization.RMSNorm`` computes it (``weight`` in the checkpoint): the mean square
    in float32 whatever the input dtype, the result cast to a half-precision weight's dtype before the weight
    multiplies it. (``torch.nn.RMSNorm``, which Flux's blocks use as diffusers' Flux does, rounds otherwise.)"""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class _GeluProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu_tanh(self.proj, x)


class FeedForward(nn.Module):
    """GELU(tanh) MLP of width ``hidden`` (default ``mult * dim``); ``net.0.proj`` and ``net.2`` as in the
    checkpoint (``net.1`` is a parameterless slot)."""

    def __init__(self, dim: int, mult: int = 4, *, hidden: int | None = None):
        super().__init__()
        hidden = dim * mult if hidden is None else hidden
        self.net = nn.ModuleList([_GeluProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# joint attention


class JointAttention(nn.Module):
    """QK-normed attention; with ``context=True`` it also projects the text stream (``add_*`` weights).

    ``norm`` builds the per-head query/key norms (``norm(head_dim, eps=eps)``): ``torch.nn.RMSNorm`` for Flux,
    :class:`RMSNorm` (diffusers' rounding) for Qwen-Image.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, context: bool, out_proj: bool, eps: float = 1e-6,
                 norm: Callable[..., nn.Module] = nn.RMSNorm):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.attention = Attention()  # no parameters: local until a strategy binds a mesh into it
        self.norm_q = norm(head_dim, eps=eps)
        self.norm_k = norm(head_dim, eps=eps)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        if out_proj:
            self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])
        if context:
            self.norm_added_q = norm(head_dim, eps=eps)
            self.norm_added_k = norm(head_dim, eps=eps)
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))

    def qkv(self, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        q = apply_rope(self.norm_q(self._heads(self.to_q(x))), rot)
        k = apply_rope(self.norm_k(self._heads(self.to_k(x))), rot)
        return q, k, self._heads(self.to_v(x))

    def added_qkv(self, c: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        q = apply_rope(self.norm_added_q(self._heads(self.add_q_proj(c))), rot)
        k = apply_rope(self.norm_added_k(self._heads(self.add_k_proj(c))), rot)
        return q, k, self._heads(self.add_v_proj(c))

    def joint(self, img: tuple[torch.Tensor, ...], txt: tuple[torch.Tensor, ...],
              key_padding_mask: torch.Tensor | None = None,
              joint_key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over [text, image]; returns (text output, image output), heads flattened.

        ``key_padding_mask`` (batch, image tokens) bool, True = a real image token; ``joint_key_padding_mask``
        (batch, text tokens) bool, True = a real text token. Tokens marked False are no key; their own outputs
        are computed and are the caller's to discard."""
        extra = {}
        if joint_key_padding_mask is not None:  # only when given: wrappers of the layer (PipeFusion) predate it
            extra["joint_key_padding_mask"] = joint_key_padding_mask
        out = self.attention(*img, joint_q=txt[0], joint_k=txt[1], joint_v=txt[2], joint_strategy="front",
                             key_padding_mask=key_padding_mask, **extra)
        out = out.flatten(2, 3).to(img[0].dtype)
        n_txt = txt[0].shape[1]
        return out[:, :n_txt], out[:, n_txt:]


def check_key_padding_mask(key_padding_mask: torch.Tensor | None, hidden_states: torch.Tensor) -> None:
    """Raise unless ``key_padding_mask`` is None or bool (rows, image tokens) as ``hidden_states`` has them (the
    ``key_padding_mask`` a transformer's forward takes for rows of mixed image sizes)."""
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape)
                                         != tuple(hidden_states.shape[:2])):
        raise ValueError(f"key_padding_mask {key_padding_mask.dtype} {tuple(key_padding_mask.shape)} must be "
                         f"bool (rows, image tokens) = {tuple(hidden_states.shape[:2])}")
