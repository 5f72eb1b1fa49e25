"""stages/models/flux/transformer.py: our Flux transformer equals diffusers' FluxTransformer2DModel for the same weights."""

import json
from pathlib import Path

import pytest
import torch

from omni_runtime.stages.models.flux.transformer import FluxConfig, FluxTransformer, rope  # noqa: E402


def _img_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _inputs(cfg: dict, batch: int, h: int, w: int, n_txt: int, guidance: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, h * w, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, n_txt, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=_img_ids(h, w),
        txt_ids=torch.zeros(n_txt, 3),
        guidance=torch.full((batch,), 3.5) if guidance else None,
    )


def _rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref.float() - out.float()).abs().max() / ref.float().abs().max()).item()


def _compare(model_dir: Path, inputs: dict) -> tuple[float, torch.Tensor]:
    from diffusers import FluxTransformer2DModel

    ref = FluxTransformer2DModel.from_pretrained(model_dir).eval()
    ours = FluxTransformer.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        got = ours(**inputs)
    assert got.shape == expected.shape
    return _rel_err(expected, got), expected


def test_tiny_model_matches_diffusers(tiny_dir):
    cfg = json.loads((tiny_dir / "transformer" / "config.json").read_text())
    inputs = _inputs(cfg, batch=2, h=6, w=10, n_txt=13, guidance=True)
    err, expected = _compare(tiny_dir / "transformer", inputs)
    assert expected.abs().max() > 0.1  # a real signal, not an all-zero output
    assert err <= 1e-5


def test_other_dims_sharded_checkpoint_matches_diffusers(tmp_path):
    """Other head count/dims/layers, guidance off, other RoPE axes, out_channels != in_channels; saved sharded."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(3)
    cfg = dict(patch_size=1, in_channels=16, out_channels=8, num_layers=2, num_single_layers=3,
               attention_head_dim=24, num_attention_heads=3, joint_attention_dim=40, pooled_projection_dim=20,
               guidance_embeds=False, axes_dims_rope=(8, 8, 8))
    FluxTransformer2DModel(**cfg).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()

    err, _ = _compare(tmp_path, _inputs(cfg, batch=3, h=5, w=7, n_txt=9, guidance=False, seed=1))
    assert err <= 1e-5


def test_bfloat16_load_is_close_to_fp32_reference(tiny_dir):
    cfg = json.loads((tiny_dir / "transformer" / "config.json").read_text())
    inputs = _inputs(cfg, batch=1, h=4, w=4, n_txt=8, guidance=True)
    ours32 = FluxTransformer.from_pretrained(tiny_dir)
    ours16 = FluxTransformer.from_pretrained(tiny_dir, dtype="bfloat16")
    assert {p.dtype for p in ours16.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        ref = ours32(**inputs)
        low = ours16(**{k: (v.bfloat16() if k != "img_ids" and k != "txt_ids" and v is not None else v)
                        for k, v in inputs.items()})
    assert low.dtype == torch.bfloat16
    assert _rel_err(ref, low) < 5e-2


def test_rope_matches_diffusers_pos_embed():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.cat([torch.zeros(5, 3), _img_ids(7, 3) + torch.tensor([0.0, 2.0, 1.0])])
    cos_ref, sin_ref = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(ids)
    cos, sin = rope(ids, (4, 6, 6))
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)


def test_guidance_mismatch_is_a_clear_error(tiny_dir):
    model = FluxTransformer.from_pretrained(tiny_dir)
    cfg = json.loads((tiny_dir / "transformer" / "config.json").read_text())
    inputs = _inputs(cfg, batch=1, h=2, w=2, n_txt=3, guidance=False)
    with pytest.raises(ValueError, match="guidance is required"):
        model(**inputs)


def test_unknown_dtype_is_a_config_error(tiny_dir):
    from omni_runtime.stages.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dtype='float8' is not supported; allowed: \['bf16', 'bfloat16'"):
        FluxTransformer.from_pretrained(tiny_dir, dtype="float8")


def test_config_rejects_rope_axes_that_do_not_sum_to_head_dim():
    from omni_runtime.stages.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"axes_dims_rope=\[4, 4, 4\].*attention_head_dim=16"):
        FluxConfig.from_dict({"attention_head_dim": 16, "axes_dims_rope": [4, 4, 4]})
    with pytest.raises(CheckpointError, match=r"config: axes_dims_rope=16; expected a list of even integers"):
        FluxConfig.from_dict({"attention_head_dim": 16, "axes_dims_rope": 16})
    with pytest.raises(CheckpointError, match=r"num_layers='2'; expected a non-negative integer"):
        FluxConfig.from_dict({"num_layers": "2"})


def test_sp_plan_is_valid_for_the_model(tiny_dir):
    from omni_runtime.parallel.attention import Attention
    from omni_runtime.parallel.sp_plan import validate_sp_plan

    model = FluxTransformer.from_pretrained(tiny_dir)
    validate_sp_plan(FluxTransformer._sp_plan, model)
    # Every block attends through parallel's Attention (local until a strategy binds a mesh), one per block.
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(layers) == len(blocks) == 2 and all(b.attn.attention in layers for b in blocks)
    assert all(layer.strategy == "none" for layer in layers)  # no mesh in this process


SP_H, SP_W, SP_TXT = 13, 9, 7  # 117 image tokens: neither 2 nor 4 divides them


def _sp_worker(rank: int, world_size: int, model_dir: str, ulysses: int, ring: int) -> dict:
    import os

    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec
    from omni_runtime.parallel.strategies import SequenceParallel

    mesh = Mesh.build(ParallelSpec(ulysses=ulysses, ring=ring), rank,
                      f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", "cpu")
    try:
        model = FluxTransformer.from_pretrained(model_dir)
        seen: list[int] = []
        model.transformer_blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
        SequenceParallel(mesh).apply(model)
        cfg = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
        with torch.no_grad():
            out = model(**_inputs(cfg, batch=2, h=SP_H, w=SP_W, n_txt=SP_TXT, guidance=True, seed=5))
        return {"out": out.flatten().tolist(), "shape": list(out.shape), "local_tokens": seen}
    finally:
        mesh.destroy()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2), (2, 2)])
def test_sequence_parallel_forward_equals_single_process(tiny_dir, ulysses, ring):
    from spawn import run_workers

    cfg = json.loads((tiny_dir / "transformer" / "config.json").read_text())
    with torch.no_grad():
        ref = FluxTransformer.from_pretrained(tiny_dir)(
            **_inputs(cfg, batch=2, h=SP_H, w=SP_W, n_txt=SP_TXT, guidance=True, seed=5))
    world = ulysses * ring
    results = run_workers(_sp_worker, world, args=(str(tiny_dir), ulysses, ring), timeout=120,
                          init_process_group=False)
    # every rank really processed only its own slice of the image tokens
    from omni_runtime.parallel.sp_sharding import shard_sizes

    local = [r["local_tokens"][0] for r in results]
    assert local == shard_sizes(SP_H * SP_W, world) and sum(local) == SP_H * SP_W and len(set(local)) > 1
    for r in results:
        assert r["shape"] == list(ref.shape)
        assert _rel_err(ref, torch.tensor(r["out"]).view(ref.shape)) <= 1e-5
