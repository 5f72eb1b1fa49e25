"""Patch-parallel decode of diffusers' causal 3D VAEs (Wan 2.1's ``AutoencoderKLWan``, Qwen-Image's
``AutoencoderKLQwenImage``: the same decoder under two sets of class names), run over the loaded modules.

The walk mirrors ``AutoencoderKLWan._decode`` / ``WanDecoder3d.forward`` (identically
``AutoencoderKLQwenImage._decode`` / ``QwenImageDecoder3d.forward``) of diffusers 0.42 and keeps its streaming:
the latent frames go through the decoder one at a time, every causal convolution taking the last frames of the
previous chunk from a feature cache. Here every rank holds a band of rows (``vae_row_ranges`` of the latent rows,
scaled through the upsamplers) of every activation and keeps the feature cache **of its own band**: the cache of a
causal convolution is the last frames of that convolution's input, which is spatially local, so each rank's cache
holds exactly the rows of diffusers' cache that its band needs.

What is not local, and how it is made exact:

- a causal 3D convolution with a ``3 x 3`` spatial kernel: the band (its cached frames prepended) receives one
  halo row from each neighbour (``PatchGroup.exchange_halo``), zero padding only at the video's true top and
  bottom rows, then the same ``conv3d`` as diffusers' on the padded input;
- the upsamplers' ``Conv2d`` (after nearest-exact 2x, which maps a band ``[a, b)`` to ``[2a, 2b)``):
  ``PatchGroup.conv2d``;
- the mid block's attention (one head over all pixels of each frame): the project's Ring attention over the patch
  group (``PatchGroup.attention``), each rank's queries against every rank's keys and values.

The RMS norm normalises each pixel over its channels (``F.normalize(dim=1)``): local, run as diffusers runs it;
so are SiLU, the 1x1x1 shortcut and ``post_quant_conv``, and the temporal ``time_conv`` of the 3D upsamplers
(kernel ``3 x 1 x 1``). Each latent frame's decoded band is clamped and gathered to group rank 0 as soon as it is
decoded, into one preallocated video: no rank holds more than one chunk's activations.

Which classes the walk runs is declared by the VAE kind (:class:`CausalVaeModules`); a decoder with a module of
another class (Wan 2.2's residual up blocks / patchified output, an attention or norm of another class) is
refused with :class:`VaePatchError` naming what, instead of being decoded wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omni_runtime.parallel.vae_patch_parallel import PatchGroup, VaePatchError, vae_row_ranges

CACHE_T = 2  # diffusers' CACHE_T: frames of a causal convolution's input kept for the next chunk


@dataclass(frozen=True)
class CausalVaeModules:
    """The diffusers module classes of one causal 3D VAE that this walk runs (a VAE kind declares them)."""

    vae: str  # the VAE's class name, for messages
    causal_conv: type
    rms_norm: type
    resample: type
    up_block: type
    attention: type


def _refuse(modules: CausalVaeModules, what: str) -> VaePatchError:
    return VaePatchError(f"patch-parallel decode of {modules.vae} does not support {what}; "
                         f"use [stages.vae.parallel] patch = 1")


def check_supported(vae: torch.nn.Module, modules: CausalVaeModules) -> None:
    """Raise :class:`VaePatchError` when ``vae``'s decoder has a module this walk cannot run exactly."""
    if getattr(vae.config, "patch_size", None) is not None:
        raise _refuse(modules, f"patch_size = {vae.config.patch_size} (Wan 2.2's patchified VAE)")
    dec = vae.decoder
    for i, up in enumerate(dec.up_blocks):
        if type(up) is not modules.up_block:
            raise _refuse(modules, f"up block {i} of class {type(up).__name__} (only {modules.up_block.__name__})")
        for u in up.upsamplers or []:
            if type(u) is not modules.resample or u.mode not in ("upsample2d", "upsample3d"):
                raise _refuse(modules, f"up block {i}'s resampler {type(u).__name__}({getattr(u, 'mode', '?')})")
    for name, m in dec.named_modules():
        if isinstance(m, modules.rms_norm) and not m.channel_first:
            raise _refuse(modules, f"{name}: a channel-last RMS norm")
        if isinstance(m, modules.causal_conv):
            kt, kh, kw = m.kernel_size
            if (m.stride != (1, 1, 1) or m.dilation != (1, 1, 1) or m.groups != 1 or kh % 2 == 0
                    or m._padding[2] != kh // 2 or m._padding[0] != kw // 2):
                raise _refuse(modules, f"{name}: causal conv with kernel {m.kernel_size}, stride {m.stride}, "
                                       f"padding {m._padding}, groups {m.groups}")
    for attn in dec.mid_block.attentions:
        if attn is not None and type(attn) is not modules.attention:
            raise _refuse(modules, f"mid-block attention {type(attn).__name__}")


class _FeatCache:
    """One rank's feature cache: diffusers' ``feat_cache`` list and ``feat_idx`` counter, for this rank's band."""

    def __init__(self, n: int) -> None:
        self.feat: list = [None] * n
        self.idx = 0


def _conv3d(pg: PatchGroup, conv, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """The causal conv's ``forward(x, cache_x)`` on a band of rows: the same rows as the unsplit convolution."""
    padding = list(conv._padding)  # (w, w, h, h, 2 * t, 0)
    if cache_x is not None and padding[4] > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        padding[4] -= cache_x.shape[2]
    ph, pw, pt = padding[2], padding[0], padding[4]
    above = below = None
    if pg.world_size > 1 and ph > 0:
        b, c, t, h, w = x.shape
        above, below = pg.exchange_halo(x.reshape(b, c * t, h, w), ph)
        pg.stats.halo_exchanges += 1
    xp = F.pad(x, padding)
    if above is not None:
        xp[:, :, pt:, :ph, pw:pw + x.shape[4]] = above.reshape(x.shape[0], x.shape[1], x.shape[2], ph, x.shape[4])
    if below is not None:
        xp[:, :, pt:, -ph:, pw:pw + x.shape[4]] = below.reshape(x.shape[0], x.shape[1], x.shape[2], ph, x.shape[4])
    return F.conv3d(xp, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _cached_conv(pg: PatchGroup, conv, x: torch.Tensor, cache: _FeatCache) -> torch.Tensor:
    """A causal convolution with its feature-cache entry, as every ``feat_cache`` block of diffusers runs it."""
    prev = cache.feat[cache.idx]
    cache_x = x[:, :, -CACHE_T:].clone()
    if cache_x.shape[2] < 2 and prev is not None:
        cache_x = torch.cat([prev[:, :, -1:].to(cache_x.device), cache_x], dim=2)
    out = _conv3d(pg, conv, x, prev)
    cache.feat[cache.idx] = cache_x
    cache.idx += 1
    return out


def _resnet(pg: PatchGroup, res, x: torch.Tensor, cache: _FeatCache) -> torch.Tensor:
    h = res.conv_shortcut(x)  # Identity or a 1x1x1 causal conv without cache: local
    x = res.nonlinearity(res.norm1(x))  # RMS over channels per pixel: local
    x = _cached_conv(pg, res.conv1, x, cache)
    x = res.dropout(res.nonlinearity(res.norm2(x)))
    x = _cached_conv(pg, res.conv2, x, cache)
    return x + h


def _attention(pg: PatchGroup, attn, x: torch.Tensor) -> torch.Tensor:
    """The mid block's attention block: one head over every pixel of each frame; this rank's pixels are the queries."""
    identity = x
    b, c, t, h, w = x.shape
    x = attn.norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    qkv = attn.to_qkv(x).reshape(b * t, c * 3, h * w).transpose(1, 2)  # (b t, pixels, 3 c)
    q, k, v = (y[:, :, None].contiguous() for y in qkv.chunk(3, dim=-1))  # (b t, pixels, 1 head, c)
    o = pg.attention(q, k, v, scale=c ** -0.5).to(q.dtype)
    x = attn.proj(o[:, :, 0].transpose(1, 2).reshape(b * t, c, h, w))
    return x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + identity


def _resample(pg: PatchGroup, rs, x: torch.Tensor, cache: _FeatCache) -> torch.Tensor:
    """The resampler in an upsampling mode: the temporal ``time_conv`` (``upsample3d``; the first chunk only marks
    its cache entry, as diffusers' ``"Rep"``), then nearest-exact 2x and the 3x3 ``Conv2d`` on every frame."""
    b, c, t, h, w = x.shape
    if rs.mode == "upsample3d":
        prev = cache.feat[cache.idx]
        if prev is None:
            cache.feat[cache.idx] = "Rep"
        else:
            rep = isinstance(prev, str)
            cache_x = x[:, :, -CACHE_T:].clone()
            if cache_x.shape[2] < 2:
                first = torch.zeros_like(cache_x) if rep else prev[:, :, -1:].to(cache_x.device)
                cache_x = torch.cat([first, cache_x], dim=2)
            x = _conv3d(pg, rs.time_conv, x, None if rep else prev)
            cache.feat[cache.idx] = cache_x
            x = x.reshape(b, 2, c, t, h, w)
            x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, w)
        cache.idx += 1
    t = x.shape[2]
    x = rs.resample[0](x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # nearest-exact 2x: local
    x = pg.conv2d(x, rs.resample[1])
    return x.view(b, t, x.size(1), x.size(2), x.size(3)).permute(0, 2, 1, 3, 4)


def _decode_chunk(pg: PatchGroup, dec, x: torch.Tensor, cache: _FeatCache) -> torch.Tensor:
    """The decoder's ``forward`` of one latent frame (this rank's band), advancing ``cache``."""
    cache.idx = 0
    x = _cached_conv(pg, dec.conv_in, x, cache)
    mid = dec.mid_block
    x = _resnet(pg, mid.resnets[0], x, cache)
    for attn, res in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            x = _attention(pg, attn, x)
        x = _resnet(pg, res, x, cache)
    for up in dec.up_blocks:
        for res in up.resnets:
            x = _resnet(pg, res, x, cache)
        for rs in up.upsamplers or []:
            x = _resample(pg, rs, x, cache)
    x = dec.nonlinearity(dec.norm_out(x))
    return _cached_conv(pg, dec.conv_out, x, cache)


def output_frames(vae: torch.nn.Module, latent_frames: int) -> int:
    """Frames of the decoded video: the first latent frame gives one, each later one ``2 ** (3D upsamplers)``."""
    ups = sum(1 for up in vae.decoder.up_blocks for u in (up.upsamplers or []) if u.mode == "upsample3d")
    return 1 + (latent_frames - 1) * 2 ** ups


def patch_decode(vae: torch.nn.Module, z: torch.Tensor, pg: PatchGroup,
                 modules: CausalVaeModules) -> torch.Tensor | None:
    """Decode ``z`` (batch, z_dim, latent frames, rows, cols), the same de-normalised latents on every rank of
    ``pg``; returns diffusers' ``vae.decode`` output (batch, 3, frames, H, W), clamped to [-1, 1], on group rank 0
    and ``None`` elsewhere. Every rank needs at least one latent row."""
    check_supported(vae, modules)
    batch, _, frames, rows, _ = z.shape
    ranges = vae_row_ranges(rows, pg.world_size)
    if any(e == s for s, e in ranges):
        raise VaePatchError(f"{rows} latent rows cannot be split over {pg.world_size} patch ranks "
                            "(every rank needs at least one row)")
    start, end = ranges[pg.rank]
    x = vae.post_quant_conv(z[:, :, :, start:end])  # a 1x1x1 convolution: local
    cache = _FeatCache(sum(isinstance(m, modules.causal_conv) for m in vae.decoder.modules()))
    total = output_frames(vae, frames)
    out, done = None, 0
    for i in range(frames):
        part = _decode_chunk(pg, vae.decoder, x[:, :, i:i + 1], cache).clamp_(-1.0, 1.0)
        b, c, t, h, w = part.shape
        factor = h // (end - start)
        full = pg.gather_rows(part.reshape(b, c * t, h, w).contiguous(), [(s * factor, e * factor) for s, e in ranges])
        del part
        if full is not None:
            if out is None:
                out = full.new_empty(b, c, total, full.shape[2], w)
            out[:, :, done:done + t] = full.view(b, c, t, full.shape[2], w)
        done += t
    if done != total:
        raise VaePatchError(f"decoded {done} frames, expected {total}")
    return out
