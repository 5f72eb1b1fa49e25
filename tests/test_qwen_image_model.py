"""stages/models/qwen_image/transformer.py: our Qwen-Image transformer equals diffusers' QwenImageTransformer2DModel
for the same checkpoint directory, also with padded + masked texts, split into pipeline stages and sharded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.models.qwen_image.transformer import (
    QwenImageConfig,
    QwenImageTransformer,
    image_ids,
    text_ids,
)

CFG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
           joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
GH, GW = 4, 6  # a non-square image grid
TEXT_LENS = (5, 9)  # rows' real text lengths; padded to 9


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen") / "transformer"
    QwenImageTransformer2DModel(**CFG).save_pretrained(path)
    return path


def _reference(path: Path):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(path, torch_dtype=torch.float64).eval()


def _ours(path: Path, **kw) -> QwenImageTransformer:
    # float32 weights widened to float64: exact (stages.device.resolve_dtype serves no float64 loads)
    return QwenImageTransformer.from_pretrained(path, **kw).double()


def _inputs(seed: int, gh: int = GH, gw: int = GW, lens: tuple[int, ...] = TEXT_LENS) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows, n_txt = len(lens), max(lens)
    return dict(
        hidden_states=torch.randn(rows, gh * gw, CFG["in_channels"], generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(rows, n_txt, CFG["joint_attention_dim"], generator=g, dtype=torch.float64),
        timestep=torch.rand(rows, generator=g, dtype=torch.float64),
        img_ids=image_ids(gh, gw),
        txt_ids=text_ids(n_txt, gh, gw),
        encoder_hidden_states_mask=torch.arange(n_txt)[None, :] < torch.tensor(lens)[:, None],
    )


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_padded_masked_rows_equal_diffusers_rows_run_alone(qwen_dir: Path) -> None:
    ref, ours = _reference(qwen_dir), _ours(qwen_dir)
    x = _inputs(seed=1)
    with torch.no_grad():
        out = ours(**x)
        errors = []
        for row, n in enumerate(TEXT_LENS):
            want = ref(hidden_states=x["hidden_states"][row:row + 1],
                       encoder_hidden_states=x["encoder_hidden_states"][row:row + 1, :n],
                       timestep=x["timestep"][row:row + 1], img_shapes=[(1, GH, GW)], return_dict=False)[0]
            assert want.abs().max() > 0.1  # a real signal
            errors.append(_rel(out[row:row + 1], want))
        # the mask matters: without it the short row's padding leaks into its prediction
        leaked = ours(**{**x, "encoder_hidden_states_mask": None})
    assert out.shape == (2, GH * GW, 4 * CFG["out_channels"])
    assert max(errors) <= 1e-10, errors
    assert _rel(leaked[:1], out[:1]) > 1e-4
    print(f"float64 worst rel err vs diffusers (padded + masked rows): {max(errors):.2e}")


def test_mask_none_equals_diffusers_on_an_odd_grid(qwen_dir: Path) -> None:
    ref, ours = _reference(qwen_dir), _ours(qwen_dir)
    x = _inputs(seed=2, gh=5, gw=3, lens=(7,))
    x["encoder_hidden_states_mask"] = None
    with torch.no_grad():
        out = ours(**x)
        want = ref(hidden_states=x["hidden_states"], encoder_hidden_states=x["encoder_hidden_states"],
                   timestep=x["timestep"], img_shapes=[(1, 5, 3)], return_dict=False)[0]
        # an all-real 1/0 mask (a tokenizer's) is the same as None
        ones = ours(**{**x, "encoder_hidden_states_mask": torch.ones(1, 7, dtype=torch.long)})
    assert _rel(out, want) <= 1e-10
    assert _rel(ones, want) <= 1e-10


def test_float32_matches_diffusers(qwen_dir: Path) -> None:
    from diffusers import QwenImageTransformer2DModel

    ref = QwenImageTransformer2DModel.from_pretrained(qwen_dir).eval()
    ours = QwenImageTransformer.from_pretrained(qwen_dir, dtype="float32")
    x = {k: (v.float() if torch.is_tensor(v) and v.dtype == torch.float64 else v) for k, v in _inputs(3).items()}
    with torch.no_grad():
        out = ours(**x)
        want = ref(hidden_states=x["hidden_states"], encoder_hidden_states=x["encoder_hidden_states"],
                   encoder_hidden_states_mask=x["encoder_hidden_states_mask"], timestep=x["timestep"],
                   img_shapes=[(1, GH, GW)] * 2, return_dict=False)[0]
    assert out.dtype == torch.float32 and _rel(out, want) <= 1e-5
    print(f"float32 rel err vs diffusers: {_rel(out, want):.2e}")


@pytest.mark.parametrize("gh,gw,n_txt", [(4, 6, 9), (5, 7, 3), (1, 1, 2)])
def test_rope_from_ids_equals_diffusers_pos_embed(gh: int, gw: int, n_txt: int) -> None:
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    img_ref, txt_ref = QwenEmbedRope(theta=10000, axes_dim=list(CFG["axes_dims_rope"]), scale_rope=True)(
        [(1, gh, gw)], max_txt_seq_len=n_txt, device=torch.device("cpu"))
    model = QwenImageTransformer(QwenImageConfig.from_dict(CFG))
    for ids, ref in ((image_ids(gh, gw), img_ref), (text_ids(n_txt, gh, gw), txt_ref)):
        cos, sin = model.pos_embed(ids)
        assert cos.shape == (ids.shape[0], CFG["attention_head_dim"])
        # pairs (2i, 2i+1) share an angle; diffusers keeps one complex number per pair
        assert torch.equal(cos[:, ::2], ref.real) and torch.equal(cos[:, 1::2], ref.real)
        assert torch.equal(sin[:, ::2], ref.imag) and torch.equal(sin[:, 1::2], ref.imag)


def test_ids_layout() -> None:
    ids = image_ids(3, 4).view(3, 4, 3)
    assert ids[..., 0].eq(0).all()
    assert ids[:, 0, 1].tolist() == [-2.0, -1.0, 0.0] and ids[0, :, 2].tolist() == [-2.0, -1.0, 0.0, 1.0]
    assert text_ids(3, 3, 4).tolist() == [[2.0] * 3, [3.0] * 3, [4.0] * 3]


def test_two_pipeline_stages_chained_by_hand_equal_the_whole_model(qwen_dir: Path) -> None:
    class PP:
        world_size = 2

        def __init__(self, rank: int) -> None:
            self.rank_in_group = rank

    whole = _ours(qwen_dir)
    first, last = _ours(qwen_dir, pp_group=PP(0)), _ours(qwen_dir, pp_group=PP(1))
    assert {k.split(".")[0] for k in first.state_dict()} == {"time_text_embed", "txt_norm", "txt_in", "img_in",
                                                             "transformer_blocks"}
    assert {k.split(".")[0] for k in last.state_dict()} == {"transformer_blocks", "norm_out", "proj_out"}
    assert all(k.startswith("transformer_blocks.0.") for k in first.state_dict() if "blocks" in k)
    assert all(k.startswith("transformer_blocks.1.") for k in last.state_dict() if "blocks" in k)
    x = _inputs(seed=4)
    with torch.no_grad():
        want = whole(**x)
        mid = first(**x)
        assert set(mid) == {"img", "txt", "temb"}
        got = last(**x, intermediate=mid)
    assert torch.equal(got, want)


def test_per_row_ids_equal_shared_ids(qwen_dir: Path) -> None:
    """(rows, tokens, 3) ids (rows of mixed image sizes carry their own) give what the shared ids give."""
    model = _ours(qwen_dir)
    x = _inputs(seed=8)
    with torch.no_grad():
        shared = model(**x)
        per_row = model(**{**x, "img_ids": x["img_ids"].expand(2, -1, -1), "txt_ids": x["txt_ids"].expand(2, -1, -1)})
    assert _rel(per_row, shared) <= 1e-14


def _write_config(path: Path, **changes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "QwenImageTransformer2DModel", **CFG, **changes}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("key", ["zero_cond_t", "guidance_embeds", "use_additional_t_cond", "use_layer3d_rope"])
def test_unserved_variants_are_refused_naming_the_key(tmp_path: Path, key: str) -> None:
    with pytest.raises(CheckpointError, match=rf"config.json: {key}=true: .* not served yet; allowed: {key}=false"):
        QwenImageTransformer.from_pretrained(_write_config(tmp_path, **{key: True}))


def test_bad_config_values_are_refused() -> None:
    with pytest.raises(CheckpointError, match=r"patch_size=1; Qwen-Image packs 2x2 latent patches, allowed: "
                                              r"patch_size=2"):
        QwenImageConfig.from_dict({**CFG, "patch_size": 1})
    with pytest.raises(CheckpointError, match=r"axes_dims_rope=\[4, 6, 4\] must be 3 even .* attention_head_dim=16"):
        QwenImageConfig.from_dict({**CFG, "axes_dims_rope": [4, 6, 4]})
    with pytest.raises(CheckpointError, match=r"axes_dims_rope=\[5, 5, 6\] must be 3 even"):
        QwenImageConfig.from_dict({**CFG, "axes_dims_rope": [5, 5, 6]})
    # unknown keys are ignored (diffusers adds some in later versions)
    assert QwenImageConfig.from_dict({**CFG, "some_future_key": 1}).num_layers == 2


def test_missing_weight_is_a_checkpoint_error_naming_it(qwen_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(qwen_dir / "diffusion_pytorch_model.safetensors")
    del state["transformer_blocks.1.attn.norm_added_k.weight"]
    save_file(state, _write_config(tmp_path) / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): transformer_blocks.1.attn.norm_added_k.weight"):
        QwenImageTransformer.from_pretrained(tmp_path)


def test_argument_errors(qwen_dir: Path) -> None:
    class EP:
        world_size = 2

    with pytest.raises(ValueError, match="no mixture-of-experts layers; allowed: ep = 1"):
        QwenImageTransformer.from_pretrained(qwen_dir, ep_group=EP())
    model = _ours(qwen_dir)
    x = _inputs(seed=5)
    with pytest.raises(ValueError, match="guidance must be None"):
        model(**x, guidance=torch.ones(2))
    with pytest.raises(ValueError, match=r"img_ids is torch.bfloat16: positions past 256 are not exact"):
        model(**{**x, "img_ids": x["img_ids"].bfloat16()})
    with pytest.raises(ValueError, match=r"txt_ids \(8, 3\) must be \(9, 3\)"):
        model(**{**x, "txt_ids": text_ids(8, GH, GW)})
    with pytest.raises(ValueError, match=r"encoder_hidden_states_mask \(2, 8\) must be \(rows, text tokens\)"):
        model(**{**x, "encoder_hidden_states_mask": x["encoder_hidden_states_mask"][:, :8]})


def test_parallel_declarations(qwen_dir: Path) -> None:
    from omni_runtime.parallel.attention import Attention
    from omni_runtime.parallel.hsdp import hsdp_units
    from omni_runtime.parallel.sp_plan import validate_sp_plan

    model = _ours(qwen_dir)
    validate_sp_plan(QwenImageTransformer._sp_plan, model)
    units = [name for name, _ in hsdp_units(model, QwenImageTransformer._hsdp_shard_conditions)]
    assert units == ["transformer_blocks.0", "transformer_blocks.1"]
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(layers) == 2 and all(b.attn.attention in layers for b in model.transformer_blocks)


# ---------------------------------------------------------------- sequence parallel, real processes

SP_GH, SP_GW = 3, 5  # 15 image tokens: 2 does not divide them


def _sp_worker(rank: int, world: int, model_dir: str, ulysses: int, ring: int) -> dict:
    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec
    from omni_runtime.parallel.strategies import SequenceParallel

    mesh = Mesh.build(ParallelSpec(ulysses=ulysses, ring=ring), rank,
                      f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", "cpu")
    try:
        model = _ours(Path(model_dir))
        seen: list[int] = []
        model.transformer_blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
        SequenceParallel(mesh).apply(model)
        with torch.no_grad():
            out = model(**_inputs(seed=6, gh=SP_GH, gw=SP_GW))
        return {"out": out.flatten().tolist(), "local_tokens": seen}
    finally:
        mesh.destroy()


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)])
def test_sequence_parallel_with_text_mask_equals_single_process(qwen_dir: Path, ulysses: int, ring: int) -> None:
    """The masked texts of rows with different lengths, image tokens split unevenly over 2 ranks."""
    from spawn import run_workers

    with torch.no_grad():
        want = _ours(qwen_dir)(**_inputs(seed=6, gh=SP_GH, gw=SP_GW))
    results = run_workers(_sp_worker, 2, args=(str(qwen_dir), ulysses, ring), timeout=120)
    assert [r["local_tokens"] for r in results] == [[8], [7]]  # each rank ran its own share of the image
    for r in results:
        assert _rel(torch.tensor(r["out"], dtype=torch.float64).view(want.shape), want) <= 1e-12


def _hsdp_worker(rank: int, world: int, model_dir: str) -> dict:
    from torch.distributed.tensor import DTensor

    from omni_runtime.parallel.hsdp import HSDPInferenceConfig

    x = {k: (v.float() if torch.is_tensor(v) and v.dtype == torch.float64 else v) for k, v in _inputs(7).items()}
    with torch.no_grad():
        want = QwenImageTransformer.from_pretrained(model_dir)(**x)
        model = QwenImageTransformer.from_pretrained(model_dir, hsdp=HSDPInferenceConfig(hsdp_shard_size=world))
        got = model(**x)
    return {"rel": _rel(got, want), "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
            "units": sum(1 for m in model.modules() if type(m).__name__.startswith("FSDP"))}


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_hsdp_sharded_load_equals_unsharded(qwen_dir: Path) -> None:
    from spawn import run_workers

    for r in run_workers(_hsdp_worker, 2, args=(str(qwen_dir),), init_process_group=True, timeout=120):
        assert r["sharded"] and r["units"] == 3, r  # the root and one unit per block
        assert r["rel"] <= 1e-6, r
