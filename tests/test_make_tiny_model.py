"""tools/make_tiny_model.py: a complete, deterministic FLUX.1-style diffusers directory that diffusers itself loads."""

import json

import numpy as np
import pytest
import torch
from make_tiny_model import main
from model_dirs import all_weights

from omni_runtime.stages.models.flux.tiny import PRESETS, make_tiny_model

COMPONENTS = ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae"]


def test_layout_and_model_index(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert {k: v for k, v in index.items() if not k.startswith("_") and v[0] is not None} == {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for c in COMPONENTS:
        assert (tiny_dir / c).is_dir(), c
    tcfg = json.loads((tiny_dir / "transformer" / "config.json").read_text())
    p = PRESETS["tiny"]
    assert (tcfg["num_layers"], tcfg["num_single_layers"], tcfg["num_attention_heads"], tcfg["guidance_embeds"]) == (
        p.num_layers, p.num_single_layers, p.num_attention_heads, True)
    assert tcfg["in_channels"] == 64 and sum(tcfg["axes_dims_rope"]) == tcfg["attention_head_dim"]
    vcfg = json.loads((tiny_dir / "vae" / "config.json").read_text())
    assert vcfg["latent_channels"] == 16 and len(vcfg["block_out_channels"]) == 4  # downsamples by 8
    assert (vcfg["scaling_factor"], vcfg["shift_factor"]) == (0.3611, 0.1159)
    scfg = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scfg["use_dynamic_shifting"] is True and (scfg["base_shift"], scfg["max_shift"]) == (0.5, 1.15)


def test_weights_are_deterministic_from_the_seed(tiny_dir, tmp_path):
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    again = make_tiny_model(tmp_path / "again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    other = make_tiny_model(tmp_path / "other", seed=1)
    a, b, c = all_weights(tiny_dir), all_weights(again), all_weights(other)
    assert sorted(a) == sorted(b) == sorted(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Every randomly initialised matrix changes with the seed.
    differs = [k for k in a if a[k].ndim == 2 and a[k].numel() > 64 and not torch.equal(a[k], c[k])]
    assert len(differs) == len([k for k in a if a[k].ndim == 2 and a[k].numel() > 64])


def test_tokenizers_are_local_and_round_trip(tiny_dir):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(tiny_dir / "tokenizer_2")
    text = "a photo of the cat, 42!"
    ids = clip(text).input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id and clip.model_max_length == 77
    # CLIP decodes every pre-token as a word (", 4 2 !"), as the real CLIP tokenizer does; words round-trip.
    assert clip.decode(clip("a photo of the cat").input_ids, skip_special_tokens=True) == "a photo of the cat"
    assert clip.decode(ids, skip_special_tokens=True) == "a photo of the cat , 4 2 !"
    ids2 = t5(text).input_ids
    assert ids2[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0 and t5.unk_token_id == 2
    assert t5.unk_token_id not in ids2
    assert t5.decode(ids2, skip_special_tokens=True) == text


def test_diffusers_flux_pipeline_loads_and_generates(tiny_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_dir)

    def run(seed: int) -> np.ndarray:
        return pipe("a photo of a cat", num_inference_steps=1, height=64, width=48, guidance_scale=3.5,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 64, 48, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3  # the seed reaches the image
    assert a.std() > 1e-3  # not a constant image


def test_cli_writes_the_same_model(tiny_dir, tmp_path):
    assert main([str(tmp_path / "cli"), "--preset", "tiny", "--seed", "0"]) == 0
    a, b = all_weights(tiny_dir), all_weights(tmp_path / "cli")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"preset='huge'.*allowed: \['small', 'tiny'\]"):
        make_tiny_model(tmp_path / "x", preset="huge")


def test_small_preset_is_larger_and_our_transformer_matches_diffusers(tiny_dir, tmp_path):
    """The benchmark preset: more layers, heads and width than tiny, and it loads in our model as in diffusers'."""
    from diffusers import FluxTransformer2DModel

    from omni_runtime.stages.models.flux.transformer import FluxTransformer

    small = make_tiny_model(tmp_path / "small", preset="small", seed=0)
    cfg = json.loads((small / "transformer" / "config.json").read_text())
    p, t = PRESETS["small"], PRESETS["tiny"]
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"]) == (
        p.num_layers, p.num_single_layers, p.num_attention_heads, p.attention_head_dim)
    n_small = sum(v.numel() for v in all_weights(small / "transformer").values())
    n_tiny = sum(v.numel() for v in all_weights(tiny_dir / "transformer").values())
    assert n_small > 50 * n_tiny and t.num_attention_heads * t.attention_head_dim < cfg["num_attention_heads"] * cfg[
        "attention_head_dim"]
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, cfg["joint_attention_dim"], generator=g),
                  pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
                  timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
                  img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                                     indexing="ij"), -1).reshape(16, 3),
                  txt_ids=torch.zeros(8, 3))
    with torch.no_grad():
        want = FluxTransformer2DModel.from_pretrained(small / "transformer").eval()(**inputs, return_dict=False)[0]
        got = FluxTransformer.from_pretrained(small)(**inputs)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
