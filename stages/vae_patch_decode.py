"""diffusers' ``AutoencoderKL`` decoder, run patch-parallel over the loaded modules (their weights, not a copy).

The walk mirrors ``AutoencoderKL._decode`` / ``Decoder.forward`` of diffusers (post_quant_conv, conv_in, the
mid block's resnet / attention / resnet, the up blocks' resnets and nearest-2x upsamplers, conv_norm_out, SiLU,
conv_out) with every conv, GroupNorm and attention routed through :class:`parallel.vae_patch_parallel.PatchGroup`.
A module this walk does not know (spatial norm, conv-transpose upsampling, a time embedding, ...) is refused
with :class:`VaePatchError` instead of being decoded wrong.
"""

from __future__ import annotations

import logging

import torch

from omni_runtime.parallel.vae_patch_parallel import PatchGroup, VaePatchError, vae_row_ranges

logger = logging.getLogger(__name__)

_ATTN_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


def _refuse(what: str) -> VaePatchError:
    return VaePatchError(f"patch-parallel VAE decode does not support {what}; use [stages.vae.parallel] patch = 1")


def check_supported(vae: torch.nn.Module) -> None:
    """Raise :class:`VaePatchError` when ``vae``'s decoder has a module the patch-parallel walk cannot run exactly."""
    dec = vae.decoder
    if not isinstance(dec.conv_norm_out, torch.nn.GroupNorm):
        raise _refuse(f"conv_norm_out {type(dec.conv_norm_out).__name__} (only GroupNorm)")
    resnets = list(dec.mid_block.resnets) + [r for up in dec.up_blocks for r in up.resnets]
    for r in resnets:
        if r.upsample is not None or r.downsample is not None or r.time_emb_proj is not None:
            raise _refuse("resnets that resample or take a time embedding")
        if not isinstance(r.norm1, torch.nn.GroupNorm) or not isinstance(r.norm2, torch.nn.GroupNorm):
            raise _refuse(f"resnet norms {type(r.norm1).__name__}/{type(r.norm2).__name__}")
    for up in dec.up_blocks:
        for u in up.upsamplers or []:
            if u.norm is not None or u.use_conv_transpose or not u.interpolate or not u.use_conv or u.name != "conv":
                raise _refuse("upsamplers other than nearest 2x + conv")
    for attn in dec.mid_block.attentions:
        if attn is None:
            continue
        proc = type(attn.processor).__name__
        if (proc not in _ATTN_PROCESSORS or attn.spatial_norm is not None or attn.group_norm is None
                or attn.norm_q is not None or attn.norm_k is not None):
            raise _refuse(f"mid-block attention with processor {proc} or extra norms")


def _resnet(res, x: torch.Tensor, pg: PatchGroup, rows: int) -> torch.Tensor:
    h = pg.group_norm(x, res.norm1, rows)
    h = pg.conv2d(res.nonlinearity(h), res.conv1)
    h = pg.group_norm(h, res.norm2, rows)
    h = pg.conv2d(res.dropout(res.nonlinearity(h)), res.conv2)
    if res.conv_shortcut is not None:
        x = pg.conv2d(x, res.conv_shortcut)
    return (x + h) / res.output_scale_factor


def _attention(attn, x: torch.Tensor, pg: PatchGroup, rows: int) -> torch.Tensor:
    b, c, hl, w = x.shape
    h = pg.group_norm(x, attn.group_norm, rows)
    t = h.reshape(b, c, hl * w).transpose(1, 2)
    q, k, v = attn.to_q(t), attn.to_k(t), attn.to_v(t)
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (y.reshape(b, hl * w, attn.heads, head_dim) for y in (q, k, v))
    o = pg.attention(q, k, v, scale=attn.scale).to(q.dtype)
    o = attn.to_out[1](attn.to_out[0](o.reshape(b, hl * w, attn.heads * head_dim)))
    o = o.transpose(-1, -2).reshape(b, c, hl, w)
    if attn.residual_connection:
        o = o + x
    return o / attn.rescale_output_factor


def _upsample(up, x: torch.Tensor, pg: PatchGroup) -> torch.Tensor:
    x = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    return pg.conv2d(x, up.conv)


def patch_decode(vae: torch.nn.Module, z: torch.Tensor, pg: PatchGroup) -> torch.Tensor | None:
    """Decode ``z`` (batch, latent_channels, rows, cols), the same full latents on every rank of ``pg``, each rank
    computing its band of rows; returns the decoded (batch, 3, H, W) on group rank 0 and ``None`` elsewhere.

    Every rank needs at least one latent row: with fewer latent rows than ranks this raises
    :class:`VaePatchError` (the stage falls back to a single-rank decode before calling this)."""
    check_supported(vae)
    latent_rows = int(z.shape[2])
    ranges = vae_row_ranges(latent_rows, pg.world_size)
    if any(e == s for s, e in ranges):
        raise VaePatchError(f"{latent_rows} latent rows cannot be split over {pg.world_size} patch ranks "
                            "(every rank needs at least one row)")
    start, end = ranges[pg.rank]
    x = z[:, :, start:end]
    rows = latent_rows
    if getattr(vae, "post_quant_conv", None) is not None:
        x = pg.conv2d(x, vae.post_quant_conv)
    dec = vae.decoder
    x = pg.conv2d(x, dec.conv_in)
    mid = dec.mid_block
    x = _resnet(mid.resnets[0], x, pg, rows)
    for attn, res in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            x = _attention(attn, x, pg, rows)
        x = _resnet(res, x, pg, rows)
    for up in dec.up_blocks:
        for res in up.resnets:
            x = _resnet(res, x, pg, rows)
        for u in up.upsamplers or []:
            x = _upsample(u, x, pg)
            rows *= 2
    x = pg.group_norm(x, dec.conv_norm_out, rows)
    x = pg.conv2d(dec.conv_act(x), dec.conv_out)
    factor = rows // latent_rows
    return pg.gather_rows(x, [(s * factor, e * factor) for s, e in ranges])
