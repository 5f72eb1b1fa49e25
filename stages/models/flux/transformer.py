"""The FLUX.1 transformer (double-stream + single-stream MMDiT) in one file.

Parameter names mirror diffusers' ``FluxTransformer2DModel`` so a diffusers ``transformer/`` checkpoint loads as it
is. Differences from diffusers are only in how the computation is organised for sequence parallelism:

- text and image tokens stay separate tensors through attention: the image tokens are the (possibly sharded)
  ``q/k/v`` and the text tokens are the replicated ``joint`` tokens, placed in front (FLUX attends over
  ``[text, image]``);
- the rotary embeddings of text and image are computed from ``txt_ids`` and ``img_ids`` separately, so sharding
  ``img_ids`` together with ``hidden_states`` shards the image rotary embeddings with them.

The model holds no rank arithmetic: ``_sp_plan`` says what to split and gather and the hooks of
``parallel.sp_hooks`` do it; attention goes through ``parallel.attention.Attention``, into which
``parallel.strategies.SequenceParallel(mesh).apply(model)`` binds the mesh at load (plain local attention until
then). The model reads no global parallel state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_runtime.parallel.hsdp import HSDPInferenceConfig, ShardCondition, block_list_condition
from omni_runtime.parallel.moe import MoEFeedForward, is_local_expert_key
from omni_runtime.parallel.sp_plan import SequenceParallelModelPlan
from omni_runtime.parallel.strategies.pipeline_parallel import PipelinePlan, is_missing
from omni_runtime.parallel.utils import cat_views
from omni_runtime.stages.block_cache import CachePlan, run_blocks
from omni_runtime.stages.cpu_linear import linear_gelu_tanh
from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.models.layers import (
    ROPE_THETA,
    TIME_CHANNELS,
    AdaNormOut,
    FeedForward,
    JointAttention,
    MLPEmbedder,
    _modulate,
    check_key_padding_mask,
    rope,
    timestep_embedding,
)
from omni_runtime.stages.models.token_sp_plan import token_sp_plan
from omni_runtime.stages.models.transformer_config import TransformerConfig
from omni_runtime.stages.models.transformer_load import load_transformer

CLASS_NAMES = ("FluxTransformer2DModel",)


@dataclass(frozen=True)
class FluxConfig(TransformerConfig):
    """The fields of a diffusers ``FluxTransformer2DModel`` config.json (defaults are FLUX.1's)."""

    class_name = "FluxTransformer2DModel"

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    # Mixture of experts in the single-stream blocks (our extension, not a diffusers key: with
    # moe_num_experts > 0 the blocks' MLP is a parallel.moe.MoEFeedForward and diffusers cannot load the model)
    moe_num_experts: int = 0
    moe_top_k: int = 2
    moe_hidden_dim: int = 0  # 0: the dense MLP's width, 4 x inner_dim
    moe_shared_expert: bool = True

    def validate(self, source: str | Path = "config") -> None:
        for name in ("patch_size", "in_channels", "num_attention_heads", "attention_head_dim",
                     "joint_attention_dim", "pooled_projection_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{source}: {name}={value!r}; expected a positive integer")
        for name in ("num_layers", "num_single_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise CheckpointError(f"{source}: {name}={value!r}; expected a non-negative integer")
        if self.moe_num_experts:
            for name in ("moe_num_experts", "moe_top_k", "moe_hidden_dim"):
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise CheckpointError(f"{source}: {name}={value!r}; expected a non-negative integer")
            if not 1 <= self.moe_top_k <= self.moe_num_experts:
                raise CheckpointError(f"{source}: moe_top_k={self.moe_top_k!r}; expected 1 <= moe_top_k <= "
                                      f"moe_num_experts={self.moe_num_experts}")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise CheckpointError(
                f"{source}: axes_dims_rope={list(self.axes_dims_rope)} must be even numbers summing to "
                f"attention_head_dim={self.attention_head_dim}")


# ----------------------------------------------------------------------------------------------------------------
# rotary position embedding


def cat_rope(txt: tuple[torch.Tensor, ...], img: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embeddings of [text, image] tokens; text's (shared) are repeated per row when image's are per row."""
    if img[0].dim() == 2:
        return torch.cat([txt[0], img[0]]), torch.cat([txt[1], img[1]])
    rows = img[0].shape[0]
    return tuple(torch.cat([t.expand(rows, *t.shape), i], dim=1) for t, i in zip(txt, img, strict=True))


class FluxPosEmbed(nn.Module):
    """Rotary embeddings from position ids; no parameters (``pos_embed`` in the checkpoint has none)."""

    def __init__(self, axes_dims: tuple[int, ...], theta: int = ROPE_THETA):
        super().__init__()
        self.axes_dims = tuple(axes_dims)
        self.theta = theta

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope(ids, self.axes_dims, self.theta)


# ----------------------------------------------------------------------------------------------------------------
# conditioning: timestep / guidance / pooled text


class TimeTextEmbed(nn.Module):
    """The conditioning vector: timestep (+ guidance) embedding plus the projected pooled text embedding."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIME_CHANNELS, dim)
        self.guidance_embedder = MLPEmbedder(TIME_CHANNELS, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


# ----------------------------------------------------------------------------------------------------------------
# AdaLN-Zero modulation


class AdaNormZero(nn.Module):
    """LayerNorm modulated by ``chunks`` vectors projected from the conditioning (``linear`` in the checkpoint)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.chunks = chunks

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(modulated x, gate, further chunks...) with the chunk order shift, scale, gate, [shift, scale, gate]."""
        mods = self.linear(F.silu(temb)).chunk(self.chunks, dim=1)
        return (_modulate(self.norm(x), mods[0], mods[1]), *mods[2:])


# ----------------------------------------------------------------------------------------------------------------
# blocks


class FluxTransformerBlock(nn.Module):
    """Double-stream block: text and image have their own weights and meet in joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaNormZero(dim, 6)
        self.norm1_context = AdaNormZero(dim, 6)
        self.attn = JointAttention(dim, heads, head_dim, context=True, out_proj=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, img_rot: tuple[torch.Tensor, ...],
                txt_rot: tuple[torch.Tensor, ...], key_padding_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(img, temb)
        c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(txt, temb)
        txt_attn, img_attn = self.attn.joint(self.attn.qkv(x, img_rot), self.attn.added_qkv(c, txt_rot),
                                            key_padding_mask)

        img = img + gate_msa[:, None] * self.attn.to_out[0](img_attn.contiguous())
        img = img + gate_mlp[:, None] * self.ff(_modulate(self.norm2(img), shift_mlp, scale_mlp))

        txt = txt + c_gate_msa[:, None] * self.attn.to_add_out(txt_attn.contiguous())
        txt = txt + c_gate_mlp[:, None] * self.ff_context(_modulate(self.norm2_context(txt), c_shift_mlp, c_scale_mlp))
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        return img, txt


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block: text and image share weights; attention and MLP run in parallel."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0, moe: FluxConfig | None = None,
                 ep_group: Any = None):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.norm = AdaNormZero(dim, 3)
        if moe is not None and moe.moe_num_experts:
            # MoE variant: proj_out projects the attention only, the MoE FFN ``ff`` replaces proj_mlp
            self.ff = MoEFeedForward(dim, moe.moe_num_experts, moe.moe_top_k, moe.moe_hidden_dim or mlp_dim,
                                     shared_expert=moe.moe_shared_expert, ep_group=ep_group)
            self.proj_out = nn.Linear(dim, dim)
        else:
            self.ff = None
            self.proj_mlp = nn.Linear(dim, mlp_dim)
            self.proj_out = nn.Linear(dim + mlp_dim, dim)
        self.attn = JointAttention(dim, heads, head_dim, context=False, out_proj=False)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, img_rot: tuple[torch.Tensor, ...],
                txt_rot: tuple[torch.Tensor, ...], key_padding_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n_txt = txt.shape[1]
        # this rank's tokens: all text, then its image tokens (after the first single block a view: the previous
        # block returned the two halves of one tensor)
        h = cat_views([txt, img], dim=1)
        x, gate = self.norm(h, temb)
        qkv = self.attn.qkv(x, cat_rope(txt_rot, img_rot))
        txt_attn, img_attn = self.attn.joint(tuple(t[:, n_txt:] for t in qkv), tuple(t[:, :n_txt] for t in qkv),
                                             key_padding_mask)
        attn = cat_views([txt_attn, img_attn], dim=1)
        if self.ff is not None:
            h = h + gate[:, None] * (self.proj_out(attn) + self.ff(x))
        else:
            mlp = linear_gelu_tanh(self.proj_mlp, x)
            h = h + gate[:, None] * self.proj_out(torch.cat([attn, mlp], dim=2))
        if h.dtype == torch.float16:
            h = h.clip(-65504, 65504)
        return h[:, n_txt:], h[:, :n_txt]


# ----------------------------------------------------------------------------------------------------------------
# the model


class FluxTransformer(nn.Module):
    """FLUX.1 denoiser. ``forward`` takes packed latents (batch, image tokens, in_channels) like diffusers'."""

    # Sequence parallelism: a slice of the image tokens per rank (``token_sp_plan``); the text tokens enter
    # attention as joint tokens in front.
    _sp_plan: SequenceParallelModelPlan = token_sp_plan()
    # HSDP: every double- and single-stream block is one FSDP unit (its weights are all-gathered just before it
    # runs and freed after); the embedders and the output head stay in the root unit.
    _hsdp_shard_conditions: list[ShardCondition] = [
        block_list_condition("transformer_blocks", "single_transformer_blocks")]
    # Pipeline parallelism: the double- then single-stream blocks are split over the pp ranks; the embedders run
    # on the first stage, the output head on the last (``pos_embed`` has no weights: every stage computes its
    # rotary embeddings). Between stages travel ``img``, ``txt`` and ``temb`` (see ``forward``'s ``intermediate``).
    _pp_plan = PipelinePlan(pre=("time_text_embed", "context_embedder", "x_embedder"),
                            blocks=("transformer_blocks", "single_transformer_blocks"),
                            head=("norm_out", "proj_out"))
    # Cache acceleration (``stages.block_cache``): the double- then the single-stream blocks, as diffusers'
    # apply_first_block_cache lists them (its first block is the first double-stream block)
    # (TeaCache: the TeaCache authors' published rescaling polynomial for FLUX.1, TeaCache4FLUX)
    _cache_plan = CachePlan(blocks=("transformer_blocks", "single_transformer_blocks"),
                            teacache=(4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00,
                                      2.64230861e-01))
    # what ``stages.models.transformer_load`` reads
    config_class = FluxConfig
    class_names = CLASS_NAMES
    keep_fp32: tuple[str, ...] = ()

    def __init__(self, config: FluxConfig, ep_group: Any = None):
        """``ep_group``: the expert-parallel ``GroupCoordinator`` of an MoE model (``None``: all experts here)."""
        super().__init__()
        config.validate()
        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.out_channels = config.output_channels
        self.pos_embed = FluxPosEmbed(config.axes_dims_rope)
        self.time_text_embed = TimeTextEmbed(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(dim, heads, head_dim) for _ in range(config.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(dim, heads, head_dim, moe=config, ep_group=ep_group)
             for _ in range(config.num_single_layers)])
        self.norm_out = AdaNormOut(dim)
        self.proj_out = nn.Linear(dim, config.patch_size ** 2 * self.out_channels)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, guidance: torch.Tensor | None = None,
                intermediate: dict[str, torch.Tensor] | None = None,
                key_padding_mask: torch.Tensor | None = None, cache_rows: torch.Tensor | None = None,
                block_cache: Any = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Predict the flow for ``hidden_states``.

        ``timestep`` is the sigma in [0, 1] and ``guidance`` the guidance scale (e.g. 3.5); both are multiplied by
        1000 here before their sinusoidal embedding, exactly as diffusers' FluxTransformer2DModel does.

        A pipeline stage (``parallel.strategies.pipeline_parallel.partition_model``) runs only the blocks it holds:
        it starts from ``intermediate`` (``{"img", "txt", "temb"}``, what the previous stage returned) instead of
        the embedders when it does not hold them, and returns that dict instead of the prediction when it does not
        hold the head.

        Rows of different image sizes in one forward (``[stages.denoiser] mixed_sizes``): ``img_ids`` may be
        per row, (rows, image tokens, 3) (a row's padding tokens take any ids), and ``key_padding_mask`` (rows,
        image tokens) bool marks each row's real image tokens (True); the padding is no key in attention and its
        outputs are to be discarded. ``img_ids`` (tokens, 3) is shared by all rows, as in diffusers; (1, tokens, 3)
        is taken as that too.

        ``block_cache`` (a ``stages.block_cache.BlockCache``) and ``cache_rows`` (rows,) the rows' keys in it: skip
        blocks per row as each row's cache decides (``stages.block_cache.run_blocks``).
        """
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        if img_ids.ndim == 3 and img_ids.shape[0] == 1:
            img_ids = img_ids[0]
        if img_ids.ndim == 3 and img_ids.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"img_ids {tuple(img_ids.shape)}: per-row ids need one row per hidden_states row "
                             f"({hidden_states.shape[0]}); or pass (image tokens, n_axes) shared by all rows")
        check_key_padding_mask(key_padding_mask, hidden_states)
        if self.config.guidance_embeds and guidance is None:
            raise ValueError("guidance is required: this model was trained with guidance embeddings "
                             "(config guidance_embeds=true)")
        if not self.config.guidance_embeds and guidance is not None:
            raise ValueError("guidance must be None: this model has no guidance embedding "
                             "(config guidance_embeds=false)")
        if img_ids.shape[-2] != hidden_states.shape[1] or img_ids.ndim not in (2, 3):
            raise ValueError(f"img_ids {tuple(img_ids.shape)} must be ([rows,] image tokens={hidden_states.shape[1]}, "
                             f"n_axes) to match hidden_states {tuple(hidden_states.shape)}")
        if intermediate is None:
            img = self.x_embedder(hidden_states)
            timestep = timestep.to(img.dtype) * 1000
            if guidance is not None:
                guidance = guidance.to(img.dtype) * 1000
            temb = self.time_text_embed(timestep, guidance, pooled_projections)
            txt = self.context_embedder(encoder_hidden_states)
        else:
            img, txt, temb = intermediate["img"], intermediate["txt"], intermediate["temb"]
        img_rot, txt_rot = self.pos_embed(img_ids), self.pos_embed(txt_ids)

        img, txt = run_blocks(self._cache_plan.block_list(self), img, txt,
                              (temb, img_rot, txt_rot, key_padding_mask), (True, img_ids.ndim == 3, False, True),
                              block_cache, cache_rows, key_padding_mask, self._cache_plan,
                              lambda: self.transformer_blocks[0].norm1(img, temb)[0])
        if is_missing(self.proj_out):
            return {"img": img, "txt": txt, "temb": temb}
        return self.proj_out(self.norm_out(img, temb))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", ep_group: Any = None,
                        hsdp: HSDPInferenceConfig | None = None, pp_group: Any = None) -> FluxTransformer:
        """Load a diffusers ``transformer/`` directory (or a model directory holding one), strictly.

        With an MoE config and an ``ep_group`` of N ranks, this rank reads only its own experts' tensors.

        Sharded checkpoints (``diffusion_pytorch_model.safetensors.index.json``) are supported. Missing or
        unexpected keys and shape mismatches raise ``CheckpointError`` listing them. With ``hsdp`` (shard degree
        > 1) the model is sharded with FSDP2 and each rank reads only its own rows of every tensor
        (:mod:`stages.sharded_load`); collective over ``hsdp``'s mesh. With a ``pp_group`` of N ranks (the mesh's
        pp group) this rank builds and reads only its pipeline stage: its blocks (``get_pp_indices`` over the
        double- then single-stream blocks), plus the embedders on the first and the head on the last.
        """
        def expert_skip(config: FluxConfig) -> Callable[[str], bool] | None:
            ep_size = getattr(ep_group, "world_size", 1)
            if not config.moe_num_experts or ep_size <= 1:
                return None
            ep_rank = ep_group.rank_in_group
            return lambda key: not is_local_expert_key(key, config.moe_num_experts, ep_size, ep_rank)

        return load_transformer(cls, path, dtype=dtype, device=device, hsdp=hsdp, pp_group=pp_group,
                                build=lambda config: cls(config, ep_group=ep_group), skip_for=expert_skip)
