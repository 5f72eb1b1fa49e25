"""The Wan 2.1 video transformer (``WanTransformer3DModel``) in one file.

Parameter names mirror diffusers' ``WanTransformer3DModel`` so a diffusers ``transformer/`` checkpoint loads as it is,
and the forward computes what diffusers' does. How the computation is organised for the runtime:

- the latents arrive *packed*, as every family's denoiser keeps them: (rows, frames x rows/2 x cols/2 tokens, C*4)
  with each token's channels in (c, dy, dx) order (``stages.latents.pack_video_latents``). diffusers' patch
  embedding, a Conv3d with kernel = stride = (1, 2, 2), is then the same product as a linear layer over a token
  (:meth:`WanTransformer._embed`), and the prediction is returned packed the same way;
- rotary positions are ids (frame, row, column) per token (:func:`video_ids`), so sharding ``img_ids`` with
  ``hidden_states`` shards the rotary embeddings with them (``WanRotaryPosEmbed`` indexes its tables by the same
  positions; angles in float64, cos/sin in float32, interleaved pairs);
- the text enters by cross-attention only: under sequence parallelism each rank's video tokens (queries) attend to
  all text tokens, which every rank holds, so cross-attention is local (``Attention(sequence_parallel=False)``)
  and only the self-attention over the video tokens goes through Ulysses / Ring.

The model holds no rank arithmetic and reads no global state: ``_sp_plan`` says what to split and gather,
``parallel.strategies`` bind the mesh into the attention layers, ``_pp_plan`` says what each pipeline stage holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_runtime.parallel.attention import Attention
from omni_runtime.parallel.hsdp import HSDPInferenceConfig, ShardCondition, block_list_condition
from omni_runtime.parallel.sp_plan import SequenceParallelModelPlan
from omni_runtime.parallel.strategies.pipeline_parallel import PipelinePlan, is_missing
from omni_runtime.stages.block_cache import CachePlan, run_blocks
from omni_runtime.stages.cpu_linear import linear_gelu_tanh
from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.models.layers import FeedForward, MLPEmbedder, apply_rope, rope, timestep_embedding
from omni_runtime.stages.models.token_sp_plan import token_sp_plan
from omni_runtime.stages.models.transformer_config import TransformerConfig
from omni_runtime.stages.models.transformer_load import load_transformer, refuse_expert_parallel

CLASS_NAMES = ("WanTransformer3DModel",)
PATCH = (1, 2, 2)  # the only patch size served: 2x2 latent pixels of one latent frame per token
ROPE_THETA = 10000
# diffusers keeps these in float32 whatever the model dtype (``_keep_in_fp32_modules``)
FP32_PARTS = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


@dataclass(frozen=True)
class WanConfig(TransformerConfig):
    """The fields of a diffusers ``WanTransformer3DModel`` config.json (defaults are diffusers')."""

    class_name = "WanTransformer3DModel"

    patch_size: tuple[int, ...] = PATCH
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str | Path = "config") -> WanConfig:
        values = dict(config)
        if isinstance(values.get("patch_size"), list):
            values["patch_size"] = tuple(values["patch_size"])
        return super().from_dict(values, source)

    def axes(self) -> tuple[int, int, int]:
        """(frame, row, column) rotary dims, as ``WanRotaryPosEmbed`` splits the head dim."""
        h = w = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - h - w, h, w

    def validate(self, source: str | Path = "config") -> None:
        if tuple(self.patch_size) != PATCH:
            raise CheckpointError(f"{source}: patch_size={list(self.patch_size)}; allowed: {list(PATCH)}")
        if self.image_dim is not None or self.added_kv_proj_dim is not None or self.pos_embed_seq_len is not None:
            raise CheckpointError(f"{source}: image_dim / added_kv_proj_dim / pos_embed_seq_len are set: an "
                                  f"image-to-video transformer is not served; allowed: null")
        if self.qk_norm != "rms_norm_across_heads":
            raise CheckpointError(f"{source}: qk_norm={self.qk_norm!r}; allowed: 'rms_norm_across_heads'")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim", "ffn_dim",
                     "rope_max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"{source}: {name}={value!r}; expected a positive integer")
        if self.attention_head_dim % 2 or any(d < 2 or d % 2 for d in self.axes()):
            raise CheckpointError(f"{source}: attention_head_dim={self.attention_head_dim} does not split into even "
                                  f"frame/row/column rotary dims")


def video_ids(frames: int, grid_h: int, grid_w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(frames * grid_h * grid_w, 3) float32 position ids (frame, row, column) of a video's packed tokens in
    (frame, row, column) order, as ``WanRotaryPosEmbed`` places them."""
    f, h, w = torch.meshgrid(torch.arange(frames), torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.stack([f, h, w], dim=-1).reshape(-1, 3).to(device=device, dtype=torch.float32)


class FP32LayerNorm(nn.LayerNorm):
    """diffusers' ``FP32LayerNorm``: the norm in float32 (weights too), the result in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class TextProjection(nn.Module):
    """diffusers' ``PixArtAlphaTextProjection(act_fn="gelu_tanh")``: ``linear_1`` -> GELU(tanh) -> ``linear_2``."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(linear_gelu_tanh(self.linear_1, x))


class ConditionEmbedder(nn.Module):
    """``condition_embedder``: the timestep's embedding and its six modulation vectors, and the projected text."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = MLPEmbedder(freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(text_dim, dim)

    def forward(self, t: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        emb_dtype = self.time_embedder.linear_1.weight.dtype
        temb = self.time_embedder(timestep_embedding(t, self.freq_dim).to(emb_dtype)).to(text.dtype)
        return temb, self.time_proj(F.silu(temb)), self.text_embedder(text)


class WanAttention(nn.Module):
    """Wan's attention: q/k RMS-normed across all heads; self-attention (rotary, sequence parallel) or
    cross-attention to the text (no rotary, local: every rank holds all text tokens)."""

    def __init__(self, dim: int, heads: int, eps: float, *, cross: bool):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        # self-attention through the runtime's layer (Ulysses / Ring when a mesh is bound); cross-attention is
        # local SDPA: this rank's queries against every text token
        self.attention = None if cross else Attention()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rot: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        src = x if context is None else context
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1))
        k = self.norm_k(self.to_k(src)).unflatten(2, (self.heads, -1))
        v = self.to_v(src).unflatten(2, (self.heads, -1))
        if rot is not None:
            q, k = apply_rope(q, rot), apply_rope(k, rot)
        if self.attention is not None:
            out = self.attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2)
        out = out.flatten(2, 3).type_as(q)
        return self.to_out[0](out)


class WanBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; modulated by the timestep (``temb6``)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim, eps = cfg.inner_dim, cfg.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, cfg.num_attention_heads, eps, cross=False)
        self.attn2 = WanAttention(dim, cfg.num_attention_heads, eps, cross=True)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, hidden=cfg.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x: torch.Tensor, text: torch.Tensor, temb6: torch.Tensor,
                rot: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x, text): the text passes unchanged (the block shape of ``stages.block_cache.run_blocks``)."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + temb6.float()).chunk(6, dim=1)
        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(h, rot=rot) * gate).type_as(x)
        x = x + self.attn2(self.norm2(x.float()).type_as(x), text)
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x), text


class WanTransformer(nn.Module):
    """Wan 2.1 denoiser over packed video latents (rows, tokens, in_channels * 4)."""

    # Sequence parallelism: a slice of the video tokens per rank (``token_sp_plan``); the text, whole on every
    # rank, is the cross-attention's keys.
    _sp_plan: SequenceParallelModelPlan = token_sp_plan()
    _hsdp_shard_conditions: list[ShardCondition] = [block_list_condition("blocks")]
    # Between stages travel ``img``, ``txt``, ``temb`` and ``temb6`` (the head's ``scale_shift_table``, a bare
    # parameter, is held by every stage).
    _pp_plan = PipelinePlan(pre=("patch_embedding", "condition_embedder"), blocks=("blocks",),
                            head=("norm_out", "proj_out"))
    # Cache acceleration (``stages.block_cache``): the one block list; no TeaCache (why: WanFamily.cache_refusals).
    _cache_plan = CachePlan(blocks=("blocks",))
    # what ``stages.models.transformer_load`` reads
    config_class = WanConfig
    class_names = CLASS_NAMES
    keep_fp32 = FP32_PARTS

    def __init__(self, config: WanConfig):
        super().__init__()
        config.validate()
        self.config = config
        dim = config.inner_dim
        self.out_channels = config.output_channels
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=PATCH, stride=PATCH)
        self.condition_embedder = ConditionEmbedder(dim, config.freq_dim, config.text_dim)
        self.blocks = nn.ModuleList([WanBlock(config) for _ in range(config.num_layers)])
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, self.out_channels * math.prod(PATCH))
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, dim))

    def _embed(self, packed: torch.Tensor) -> torch.Tensor:
        """The Conv3d patch embedding as a linear layer over packed tokens (same weights, same products)."""
        w = self.patch_embedding.weight
        return F.linear(packed.to(w.dtype), w.flatten(1), self.patch_embedding.bias)

    def _unpatch(self, out: torch.Tensor) -> torch.Tensor:
        """``proj_out``'s (dy, dx, c) channel order -> the packed (c, dy, dx) order of the latents."""
        return out.unflatten(-1, (4, self.out_channels)).transpose(-1, -2).flatten(-2)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                img_ids: torch.Tensor, txt_ids: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                intermediate: dict[str, torch.Tensor] | None = None, cache_rows: torch.Tensor | None = None,
                block_cache: Any = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Predict the flow for packed ``hidden_states`` (rows, tokens, in_channels * 4), packed the same way.

        ``encoder_hidden_states`` (rows, text tokens, text_dim); ``timestep`` (rows,) the sigma in [0, 1] (the
        runtime's convention; diffusers' pipeline passes t = 1000 sigma, which the embedding takes here);
        ``img_ids`` (tokens, 3) float32 (:func:`video_ids`); ``txt_ids`` is not used (the text has no rotary
        positions); ``guidance`` must be None (Wan has no guidance embedding). A pipeline stage starts from
        ``intermediate`` when it does not hold the embedders and returns it when it does not hold the head.
        ``block_cache`` / ``cache_rows``: cache acceleration per row (``stages.block_cache.run_blocks``)."""
        if guidance is not None:
            raise ValueError("guidance must be None: Wan has no guidance embedding")
        if img_ids.ndim != 2 or img_ids.shape != (hidden_states.shape[1], 3):
            raise ValueError(f"img_ids {tuple(img_ids.shape)} must be ({hidden_states.shape[1]}, 3)")
        if intermediate is None:
            img = self._embed(hidden_states)
            temb, temb6, txt = self.condition_embedder(timestep.float() * 1000, encoder_hidden_states)
            temb6 = temb6.unflatten(1, (6, -1))
        else:
            img, txt, temb, temb6 = (intermediate[k] for k in ("img", "txt", "temb", "temb6"))
        rot = rope(img_ids, self.config.axes(), ROPE_THETA, dtype=torch.float64)
        img, txt = run_blocks(self._cache_plan.block_list(self), img, txt, (temb6, rot), (True, False),
                              block_cache, cache_rows)
        if is_missing(self.proj_out):
            return {"img": img, "txt": txt, "temb": temb, "temb6": temb6}
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        img = (self.norm_out(img.float()) * (1 + scale) + shift).type_as(img)
        return self._unpatch(self.proj_out(img))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", ep_group: Any = None,
                        hsdp: HSDPInferenceConfig | None = None, pp_group: Any = None) -> WanTransformer:
        """Load a diffusers ``transformer/`` directory strictly (as ``QwenImageTransformer.from_pretrained``);
        the parts diffusers keeps in float32 (:data:`FP32_PARTS`) stay float32 in any dtype."""
        refuse_expert_parallel(ep_group, "Wan")
        return load_transformer(cls, path, dtype=dtype, device=device, hsdp=hsdp, pp_group=pp_group)
