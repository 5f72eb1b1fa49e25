"""The Qwen-Image transformer (60 double-stream MMDiT blocks) in one file.

Parameter names mirror diffusers' ``QwenImageTransformer2DModel`` so a diffusers ``transformer/`` checkpoint loads as
it is, and the forward computes what diffusers' does. Differences are only in how the computation is organised for
sequence parallelism, as in ``stages/models/flux/transformer.py``:

- text and image tokens stay separate tensors through attention: the image tokens are the (possibly sharded)
  ``q/k/v`` and the text tokens the replicated ``joint`` tokens in front (Qwen-Image attends over [text, image]);
  padded text tokens are masked as keys with ``joint_key_padding_mask`` (diffusers masks them in its joint mask);
- rotary positions are ids (:func:`image_ids`, :func:`text_ids`), so sharding ``img_ids`` with ``hidden_states``
  shards the image rotary embeddings with them. Diffusers' ``QwenEmbedRope(scale_rope=True)`` indexes tables by
  the same positions: an image's rows ``-(h - h//2) .. h//2 - 1`` (negative ones from its ``neg_freqs``), its
  columns likewise, frame 0, and text token ``j`` at ``max(h//2, w//2) + j`` on all three axes; angles in float32.

The model holds no rank arithmetic and reads no global state: ``_sp_plan`` says what to split and gather,
``parallel.strategies`` bind the mesh into the attention layers, ``_pp_plan`` says what each pipeline stage holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni_runtime.parallel.hsdp import HSDPInferenceConfig, ShardCondition, block_list_condition
from omni_runtime.parallel.sp_plan import SequenceParallelModelPlan
from omni_runtime.parallel.strategies.pipeline_parallel import PipelinePlan, is_missing
from omni_runtime.stages.block_cache import CachePlan, run_blocks
from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.models.layers import (
    ROPE_THETA,
    TIME_CHANNELS,
    AdaNormOut,
    FeedForward,
    JointAttention,
    MLPEmbedder,
    RMSNorm,
    _modulate,
    check_key_padding_mask,
    rope,
)
from omni_runtime.stages.models.token_sp_plan import token_sp_plan
from omni_runtime.stages.models.transformer_config import TransformerConfig
from omni_runtime.stages.models.transformer_load import load_transformer, refuse_expert_parallel

CLASS_NAMES = ("QwenImageTransformer2DModel",)
TIME_SCALE = 1000  # diffusers' Timesteps(scale=1000): the sigma in [0, 1] times 1000, inside the projection

# flags of diffusers' config for variants this runtime does not serve (yet): key -> what the variant is
_UNSERVED_FLAGS = {
    "guidance_embeds": "the guidance-distilled variant (a guidance embedding)",
    "zero_cond_t": "the zero-timestep conditioning of edit variants (zero_cond_t)",
    "use_additional_t_cond": "the additional timestep condition (use_additional_t_cond)",
    "use_layer3d_rope": "the layered 3D rotary embedding (use_layer3d_rope)",
}


@dataclass(frozen=True)
class QwenImageConfig(TransformerConfig):
    """The fields of a diffusers ``QwenImageTransformer2DModel`` config.json (defaults are Qwen-Image's)."""

    class_name = "QwenImageTransformer2DModel"

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    def validate(self, source: str | Path = "config") -> None:
        for name, what in _UNSERVED_FLAGS.items():
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise CheckpointError(f"{source}: {name}={value!r}; expected true or false")
            if value:
                raise CheckpointError(f"{source}: {name}=true: {what} is not served yet; allowed: {name}=false")
        for name in ("patch_size", "in_channels", "num_attention_heads", "attention_head_dim",
                     "joint_attention_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"{source}: {name}={value!r}; expected a positive integer")
        if self.patch_size != 2:
            raise CheckpointError(f"{source}: patch_size={self.patch_size}; Qwen-Image packs 2x2 latent patches, "
                                  f"allowed: patch_size=2")
        if self.out_channels is not None and (not isinstance(self.out_channels, int)
                                              or isinstance(self.out_channels, bool) or self.out_channels < 1):
            raise CheckpointError(f"{source}: out_channels={self.out_channels!r}; expected a positive integer or "
                                  f"null")
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or self.num_layers < 0:
            raise CheckpointError(f"{source}: num_layers={self.num_layers!r}; expected a non-negative integer")
        axes = self.axes_dims_rope
        if len(axes) != 3 or sum(axes) != self.attention_head_dim or any(d < 2 or d % 2 for d in axes):
            raise CheckpointError(
                f"{source}: axes_dims_rope={list(axes)} must be 3 even positive numbers (frame, height, width) "
                f"summing to attention_head_dim={self.attention_head_dim}")


# ----------------------------------------------------------------------------------------------------------------
# rotary positions


def image_ids(grid_h: int, grid_w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(grid_h * grid_w, 3) float32 position ids of an image's packed tokens (row-major): frame 0, row
    ``-(grid_h - grid_h//2) .. grid_h//2 - 1``, column ``-(grid_w - grid_w//2) .. grid_w//2 - 1``, as
    ``QwenEmbedRope(scale_rope=True)`` places a (1, grid_h, grid_w) image. Keep ids in float32 (or wider): a
    half-precision cast rounds positions past 256."""
    rows = torch.arange(grid_h, dtype=torch.float32, device=device) - (grid_h - grid_h // 2)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device) - (grid_w - grid_w // 2)
    ids = torch.zeros(grid_h, grid_w, 3, dtype=torch.float32, device=device)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(grid_h * grid_w, 3)


def text_ids(text_len: int, grid_h: int, grid_w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(text_len, 3) float32 position ids of the text tokens that go with a (grid_h, grid_w) image: token ``j`` at
    ``max(grid_h // 2, grid_w // 2) + j`` on all three axes (diffusers' ``txt_freqs``)."""
    start = max(grid_h // 2, grid_w // 2)
    pos = torch.arange(start, start + text_len, dtype=torch.float32, device=device)
    return pos[:, None].expand(text_len, 3).contiguous()


class QwenPosEmbed(nn.Module):
    """Rotary (cos, sin) from position ids, angles in float32 and cos/sin as ``torch.polar`` gives them (diffusers'
    ``rope_params``); no parameters (``pos_embed`` in the checkpoint has none)."""

    def __init__(self, axes_dims: tuple[int, ...], theta: int = ROPE_THETA):
        super().__init__()
        self.axes_dims = tuple(axes_dims)
        self.theta = theta

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope(ids, self.axes_dims, self.theta, dtype=torch.float32, polar=True)


# ----------------------------------------------------------------------------------------------------------------
# conditioning


def time_proj(sigma: torch.Tensor, channels: int = TIME_CHANNELS, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (cos first, then sin), float32, of sigmas in [0, 1], in diffusers' order of operations
    for ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)``: the float32 sigma times the
    frequencies, then times 1000 (not the sigma times 1000 first, as Flux's embedding takes it)."""
    half = channels // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
    angles = TIME_SCALE * (sigma[:, None].float() * torch.exp(exponent)[None, :])
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepProjEmbed(nn.Module):
    """The conditioning vector from the timestep (``time_text_embed`` in the checkpoint: ``timestep_embedder``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIME_CHANNELS, dim)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(time_proj(sigma).to(dtype))


# ----------------------------------------------------------------------------------------------------------------
# the block


class QwenImageTransformerBlock(nn.Module):
    """Double-stream block: text and image have their own modulation, norms and MLPs and meet in joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = JointAttention(dim, heads, head_dim, context=True, out_proj=True, eps=eps, norm=RMSNorm)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_mlp = FeedForward(dim)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_mlp = FeedForward(dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, img_rot: tuple[torch.Tensor, ...],
                txt_rot: tuple[torch.Tensor, ...], key_padding_mask: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``key_padding_mask`` (rows, image tokens) / ``text_mask`` (rows, text tokens) bool: the real tokens."""
        # per stream: (shift, scale, gate) before attention, then (shift, scale, gate) before the MLP
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(temb).chunk(6, dim=-1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(temb).chunk(6, dim=-1)

        x = _modulate(self.img_norm1(img), i_shift1, i_scale1)
        c = _modulate(self.txt_norm1(txt), t_shift1, t_scale1)
        txt_attn, img_attn = self.attn.joint(self.attn.qkv(x, img_rot), self.attn.added_qkv(c, txt_rot),
                                             key_padding_mask, text_mask)
        img = img + i_gate1[:, None] * self.attn.to_out[0](img_attn.contiguous())
        txt = txt + t_gate1[:, None] * self.attn.to_add_out(txt_attn.contiguous())

        img = img + i_gate2[:, None] * self.img_mlp(_modulate(self.img_norm2(img), i_shift2, i_scale2))
        txt = txt + t_gate2[:, None] * self.txt_mlp(_modulate(self.txt_norm2(txt), t_shift2, t_scale2))
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        if img.dtype == torch.float16:
            img = img.clip(-65504, 65504)
        return img, txt


# ----------------------------------------------------------------------------------------------------------------
# the model


def _check_ids(name: str, ids: torch.Tensor, tokens: int, rows: int) -> torch.Tensor:
    """``ids`` as (tokens, 3) shared by every row or (rows, tokens, 3); a (1, tokens, 3) is taken as shared."""
    if ids.ndim == 3 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim not in (2, 3) or ids.shape[-1] != 3 or ids.shape[-2] != tokens or (ids.ndim == 3
                                                                                   and ids.shape[0] != rows):
        raise ValueError(f"{name} {tuple(ids.shape)} must be ({tokens}, 3) shared by all rows or ({rows}, {tokens}, "
                         f"3), one per row")
    if ids.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"{name} is {ids.dtype}: positions past 256 are not exact in half precision; pass float32 "
                         f"(or wider) ids")
    return ids


class QwenImageTransformer(nn.Module):
    """Qwen-Image denoiser. ``forward`` takes packed latents (rows, image tokens, in_channels) like diffusers'."""

    # Sequence parallelism: a slice of the image tokens per rank (``token_sp_plan``); the text tokens enter
    # attention as joint tokens in front, with their padding mask.
    _sp_plan: SequenceParallelModelPlan = token_sp_plan()
    # HSDP: every block is one FSDP unit; the embedders and the output head stay in the root unit.
    _hsdp_shard_conditions: list[ShardCondition] = [block_list_condition("transformer_blocks")]
    # Pipeline parallelism: the blocks are split over the pp ranks, the embedders run on the first stage and the
    # head on the last (``pos_embed`` has no weights: every stage computes its rotary embeddings from the ids).
    # Between stages travel ``img``, ``txt`` and ``temb``; the text mask is a row argument every stage gets.
    _pp_plan = PipelinePlan(pre=("time_text_embed", "txt_norm", "txt_in", "img_in"),
                            blocks=("transformer_blocks",),
                            head=("norm_out", "proj_out"))
    # Cache acceleration (``stages.block_cache``): the one block list
    _cache_plan = CachePlan(blocks=("transformer_blocks",))
    # what ``stages.models.transformer_load`` reads
    config_class = QwenImageConfig
    class_names = CLASS_NAMES
    keep_fp32: tuple[str, ...] = ()

    def __init__(self, config: QwenImageConfig):
        super().__init__()
        config.validate()
        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.out_channels = config.output_channels
        self.pos_embed = QwenPosEmbed(config.axes_dims_rope)
        self.time_text_embed = TimestepProjEmbed(dim)
        self.txt_norm = RMSNorm(config.joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [QwenImageTransformerBlock(dim, heads, head_dim) for _ in range(config.num_layers)])
        self.norm_out = AdaNormOut(dim)
        self.proj_out = nn.Linear(dim, config.patch_size ** 2 * self.out_channels)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                img_ids: torch.Tensor, txt_ids: torch.Tensor, encoder_hidden_states_mask: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, intermediate: dict[str, torch.Tensor] | None = None,
                key_padding_mask: torch.Tensor | None = None, cache_rows: torch.Tensor | None = None,
                block_cache: Any = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Predict the flow for ``hidden_states`` (rows, image tokens, in_channels): (rows, image tokens,
        patch_size**2 * out_channels).

        ``encoder_hidden_states`` (rows, text tokens, joint_attention_dim); ``timestep`` (rows,) the sigma in
        [0, 1] (diffusers' pipeline passes t / 1000; the projection multiplies by 1000, as diffusers' does);
        ``img_ids`` (image tokens, 3) shared by the rows or (rows, image tokens, 3) (:func:`image_ids`);
        ``txt_ids`` (text tokens, 3) shared, or (rows, text tokens, 3) (:func:`text_ids`); ids in float32 or
        wider. ``encoder_hidden_states_mask`` (rows, text tokens), True (or non-zero) = a real text token: the
        others are no key in any block's attention (None: all real); their outputs are computed and meaningless.
        ``key_padding_mask`` (rows, image tokens) bool marks real image tokens the same way (rows of mixed image
        sizes padded to the longest); image tokens are never masked without it. ``guidance`` must be None (the
        guidance-distilled variant is refused at load).

        A pipeline stage (``partition_model``) runs only the blocks it holds: it starts from ``intermediate``
        (``{"img", "txt", "temb"}``, what the previous stage returned) when it does not hold the embedders, and
        returns that dict instead of the prediction when it does not hold the head.

        ``block_cache`` / ``cache_rows``: cache acceleration per row (``stages.block_cache.run_blocks``).
        """
        rows = hidden_states.shape[0]
        n_txt = encoder_hidden_states.shape[1]
        if guidance is not None:
            raise ValueError("guidance must be None: this Qwen-Image model has no guidance embedding "
                             "(config guidance_embeds=false)")
        img_ids = _check_ids("img_ids", img_ids, hidden_states.shape[1], rows)
        txt_ids = _check_ids("txt_ids", txt_ids, n_txt, rows)
        check_key_padding_mask(key_padding_mask, hidden_states)
        text_mask = encoder_hidden_states_mask
        if text_mask is not None:
            if tuple(text_mask.shape) != (rows, n_txt):
                raise ValueError(f"encoder_hidden_states_mask {tuple(text_mask.shape)} must be (rows, text tokens) "
                                 f"= {(rows, n_txt)}")
            if text_mask.dtype != torch.bool:  # 1/0 masks as tokenizers return them, like diffusers accepts
                text_mask = text_mask != 0
        if intermediate is None:
            img = self.img_in(hidden_states)
            temb = self.time_text_embed(timestep.to(img.dtype), img.dtype)
            txt = self.txt_in(self.txt_norm(encoder_hidden_states))
        else:
            img, txt, temb = intermediate["img"], intermediate["txt"], intermediate["temb"]
        img_rot, txt_rot = self.pos_embed(img_ids), self.pos_embed(txt_ids)

        img, txt = run_blocks(self._cache_plan.block_list(self), img, txt,
                              (temb, img_rot, txt_rot, key_padding_mask, text_mask),
                              (True, img_ids.ndim == 3, txt_ids.ndim == 3, True, True),
                              block_cache, cache_rows, key_padding_mask)
        if is_missing(self.proj_out):
            return {"img": img, "txt": txt, "temb": temb}
        return self.proj_out(self.norm_out(img, temb))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", ep_group: Any = None,
                        hsdp: HSDPInferenceConfig | None = None, pp_group: Any = None) -> QwenImageTransformer:
        """Load a diffusers ``transformer/`` directory (or a model directory holding one), strictly.

        Sharded checkpoints (``diffusion_pytorch_model.safetensors.index.json``) are supported. Missing or
        unexpected keys and shape mismatches raise ``CheckpointError`` listing them. With ``hsdp`` (shard degree
        > 1) the model is sharded with FSDP2 and each rank reads only its own rows of every tensor; collective over
        ``hsdp``'s mesh. With a ``pp_group`` of N ranks this rank builds and reads only its pipeline stage: its
        blocks, plus the embedders on the first and the head on the last. ``ep_group`` must be None or of one rank:
        this family has no mixture of experts.
        """
        refuse_expert_parallel(ep_group, "Qwen-Image")
        return load_transformer(cls, path, dtype=dtype, device=device, hsdp=hsdp, pp_group=pp_group)
