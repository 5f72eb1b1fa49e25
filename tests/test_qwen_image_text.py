"""The tiny Qwen-Image model (stages/models/qwen_image/tiny.py) and the Qwen-Image text encoder (text.py).

- the maker writes a directory diffusers' own ``QwenImagePipeline`` loads and runs; the same seed gives the same
  weights, another seed others; an unknown preset is a clear error; the CLI's ``--family qwen_image`` writes it;
- its tokenizer loads the same through AutoTokenizer, the pipeline and the plain vocab files, and cuts the
  pipeline's template so that the 34 dropped tokens are exactly the template's prefix;
- ``QwenImageTextEncoder.encode`` equals ``QwenImagePipeline.encode_prompt`` per prompt (alone and batched) and
  with a short ``max_sequence_length``; bad inputs are ``RequestError``, a wrong class a ``CheckpointError``;
- the checkpoint's key layout (transformers 5 saves ``model.layers.*``, builds ``model.language_model.layers.*``)
  is read by the sharded loader, and the 2-rank HSDP encoder gives the unsharded embeddings.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from model_dirs import all_weights
from safetensors import safe_open

from omni_runtime.stages.errors import CheckpointError, RequestError
from omni_runtime.stages.models.qwen_image.text import (
    CHECKPOINT_RENAMES,
    HSDP_SHARD_CONDITIONS,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_START_IDX,
    QwenImageTextEncoder,
)
from omni_runtime.stages.models.qwen_image.tiny import PRESETS, make_tiny_qwen_image

PROMPTS = ["a red cat", "a photo of a dog with a red cat on the sofa, at night; 猫 é"]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pipe(qwen_tiny_dir):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(qwen_tiny_dir)


@pytest.fixture(scope="module")
def encoder(qwen_tiny_dir) -> QwenImageTextEncoder:
    return QwenImageTextEncoder.from_pretrained(qwen_tiny_dir)


# ------------------------------------------------------------------------------------------------ the maker


def test_layout_and_configs(qwen_tiny_dir):
    index = json.loads((qwen_tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert {k: v for k, v in index.items() if not k.startswith("_")} == {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    p = PRESETS["tiny"]
    tcfg = json.loads((qwen_tiny_dir / "transformer" / "config.json").read_text())
    assert (tcfg["num_layers"], tcfg["num_attention_heads"], tcfg["attention_head_dim"], tcfg["patch_size"]) == (
        p.num_layers, p.num_attention_heads, p.attention_head_dim, 2)
    assert (tcfg["in_channels"], tcfg["out_channels"], tcfg["joint_attention_dim"]) == (64, 16, p.text_hidden)
    assert sum(tcfg["axes_dims_rope"]) == tcfg["attention_head_dim"]
    vcfg = json.loads((qwen_tiny_dir / "vae" / "config.json").read_text())
    assert vcfg["z_dim"] == 16 and 2 ** len(vcfg["temperal_downsample"]) == 8
    mean, std = np.array(vcfg["latents_mean"]), np.array(vcfg["latents_std"])
    assert mean.shape == std.shape == (16,)
    assert (np.abs(mean) <= 0.5).all() and ((0.5 <= std) & (std <= 2)).all() and mean.std() > 0.05
    scfg = json.loads((qwen_tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    assert {k: scfg[k] for k in ("use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
                                 "max_image_seq_len", "shift", "shift_terminal", "time_shift_type")} == dict(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
        shift=1.0, shift_terminal=0.02, time_shift_type="exponential")
    ecfg = json.loads((qwen_tiny_dir / "text_encoder" / "config.json").read_text())
    text = ecfg["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (
        p.text_hidden, p.text_layers, p.text_heads)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert 2 * sum(text["rope_parameters"]["mrope_section"]) == head_dim
    assert ecfg["vision_config"]["depth"] == 1
    vocab = text["vocab_size"]
    assert all(0 <= ecfg[k] < vocab for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                              "vision_end_token_id"))


def test_diffusers_loads_and_runs_it(pipe):
    assert pipe.vae_scale_factor == 8
    out = pipe("a red cat", height=48, width=64, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 48, 64, 3) and np.isfinite(out).all() and out.std() > 1e-4


def test_tokenizer_loads_the_same_everywhere_and_drops_the_template_prefix(qwen_tiny_dir, pipe, tmp_path):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(qwen_tiny_dir / "tokenizer"), local_files_only=True)
    files_only = tmp_path / "tokenizer"  # vocab.json + merges.txt, as a tokenizer without tokenizer.json reads it
    shutil.copytree(qwen_tiny_dir / "tokenizer", files_only)
    (files_only / "tokenizer.json").unlink()
    plain = AutoTokenizer.from_pretrained(str(files_only), local_files_only=True)
    assert len(auto) == len(pipe.tokenizer) == len(plain) < 512
    ecfg = json.loads((qwen_tiny_dir / "text_encoder" / "config.json").read_text())
    assert len(auto) <= ecfg["text_config"]["vocab_size"]
    texts = [PROMPT_TEMPLATE.format(p) for p in [*PROMPTS, "", "  two  spaces\n\nand lines"]]
    want = pipe.tokenizer(texts).input_ids
    assert auto(texts).input_ids == want == plain(texts).input_ids
    assert auto.pad_token == "<|endoftext|>"
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(auto(special).input_ids) == 1, special
    # Every template word is one token, as in Qwen2's real vocabulary: the pipeline's 34 dropped tokens are exactly
    # the template before the prompt.
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    assert len(auto(prefix).input_ids) == PROMPT_TEMPLATE_START_IDX == pipe.prompt_template_encode_start_idx
    assert want[0][:PROMPT_TEMPLATE_START_IDX] == auto(prefix).input_ids
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE and pipe.tokenizer_max_length == 1024


def test_same_seed_same_weights_and_the_callers_rng_is_left_alone(qwen_tiny_dir, tmp_path):
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    start = time.perf_counter()
    again = make_tiny_qwen_image(tmp_path / "again", seed=0)
    print(f"make_tiny_qwen_image(tiny): {time.perf_counter() - start:.2f} s")
    assert torch.equal(torch.random.get_rng_state(), before)
    other = make_tiny_qwen_image(tmp_path / "other", seed=1)
    a, b, c = all_weights(qwen_tiny_dir), all_weights(again), all_weights(other)
    assert sorted(a) == sorted(b) == sorted(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for comp in ("transformer", "vae", "text_encoder"):
        assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith(comp + "/")), comp
    for name in ("vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer.json"):
        assert (qwen_tiny_dir / name).read_text() == (again / name).read_text(), name
    mean = lambda d: json.loads((d / "vae" / "config.json").read_text())["latents_mean"]  # noqa: E731
    assert mean(other) != mean(qwen_tiny_dir)


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"preset='huge' is not known for qwen_image; allowed: \['small', 'tiny'\]"):
        make_tiny_qwen_image(tmp_path / "x", preset="huge")
    assert not (tmp_path / "x").exists()


def test_cli_family_flag(qwen_tiny_dir, tmp_path, capsys):
    from make_tiny_model import main

    assert main([str(tmp_path / "cli"), "--family", "qwen_image", "--seed", "0"]) == 0
    a, b = all_weights(qwen_tiny_dir), all_weights(tmp_path / "cli")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "moe"), "--family", "qwen_image", "--moe-experts", "2"])
    assert "--moe-experts is for --family flux only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--family", "sd3"])


def test_small_preset_is_larger(tmp_path):
    from diffusers import QwenImagePipeline

    small = make_tiny_qwen_image(tmp_path / "small", preset="small", seed=0)
    p = PRESETS["small"]
    tcfg = json.loads((small / "transformer" / "config.json").read_text())
    assert (tcfg["num_layers"], tcfg["num_attention_heads"], tcfg["attention_head_dim"], tcfg["axes_dims_rope"]) == (
        p.num_layers, p.num_attention_heads, p.attention_head_dim, list(p.axes_dims_rope))
    assert tcfg["joint_attention_dim"] == p.text_hidden > PRESETS["tiny"].text_hidden
    pipe = QwenImagePipeline.from_pretrained(small)
    embeds, _ = pipe.encode_prompt("a red cat")
    assert embeds.shape[-1] == p.text_hidden
    got = QwenImageTextEncoder.from_pretrained(small).encode(["a red cat"])[0]["prompt_embeds"]
    torch.testing.assert_close(got, embeds[0].detach(), **TOL)


# ------------------------------------------------------------------------------------------- the text encoder


def _diffusers(pipe, prompt, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt, device=torch.device("cpu"), **kwargs)
    return embeds, mask


def test_one_prompt_equals_diffusers(encoder, pipe):
    got = encoder.encode([PROMPTS[0]])
    assert len(got) == 1 and set(got[0]) == {"prompt_embeds"}
    want, mask = _diffusers(pipe, PROMPTS[0])
    assert mask is None  # one prompt: no padding
    assert got[0]["prompt_embeds"].shape == want[0].shape and got[0]["prompt_embeds"].dtype == torch.float32
    torch.testing.assert_close(got[0]["prompt_embeds"], want[0], **TOL)


def test_a_batch_equals_each_prompt_alone_and_diffusers_batch(encoder, pipe):
    got = encoder.encode(PROMPTS)
    lengths = [g["prompt_embeds"].shape[0] for g in got]
    assert lengths[0] < lengths[1]
    for prompt, g in zip(PROMPTS, got, strict=True):
        want, _ = _diffusers(pipe, prompt)
        torch.testing.assert_close(g["prompt_embeds"], want[0], **TOL)
    batch, mask = _diffusers(pipe, PROMPTS)
    assert mask.sum(1).tolist() == lengths
    for i, g in enumerate(got):
        torch.testing.assert_close(g["prompt_embeds"], batch[i, :lengths[i]], **TOL)
    # the same prompt in another batch (other padding) gives the same rows
    torch.testing.assert_close(encoder.encode([PROMPTS[1], "x"])[0]["prompt_embeds"], got[1]["prompt_embeds"], **TOL)


def test_max_sequence_length_cuts_each_prompt(encoder, pipe):
    got = encoder.encode(PROMPTS, max_sequence_length=6)
    for prompt, g in zip(PROMPTS, got, strict=True):
        want, _ = _diffusers(pipe, prompt, max_sequence_length=6)
        assert want.shape[1] == 6
        torch.testing.assert_close(g["prompt_embeds"], want[0], **TOL)
    full = encoder.encode([PROMPTS[0]], max_sequence_length=1024)[0]["prompt_embeds"]
    assert full.shape[0] > 6 and torch.equal(full, encoder.encode([PROMPTS[0]])[0]["prompt_embeds"])


@pytest.mark.parametrize("prompts, kwargs, says", [
    ([], {}, "prompts=[] is not allowed"),
    ("a cat", {}, "prompts='a cat' is not allowed"),
    (["a cat", 3], {}, "prompts=['a cat', 3] is not allowed"),
    (["a cat"], {"max_sequence_length": 0}, "max_sequence_length=0 is not allowed; it must be an integer from 1 to "
                                            "1024"),
    (["a cat"], {"max_sequence_length": 2000}, "max_sequence_length=2000 is not allowed"),
    (["a cat"], {"max_sequence_length": True}, "max_sequence_length=True is not allowed"),
    (["a cat"], {"max_sequence_length": 8.0}, "max_sequence_length=8.0 is not allowed"),
])
def test_bad_inputs_are_request_errors(encoder, prompts, kwargs, says):
    with pytest.raises(RequestError) as e:
        encoder.encode(prompts, **kwargs)
    assert says in str(e.value)


@pytest.mark.parametrize("entry", [["transformers", "CLIPTextModel"], ["transformers", "Qwen2VLForConditionalGeneration"],
                                   ["diffusers", "Qwen2_5_VLForConditionalGeneration"]])
def test_another_text_encoder_class_is_a_checkpoint_error(qwen_tiny_dir, tmp_path, entry):
    model = Path(shutil.copytree(qwen_tiny_dir, tmp_path / "model"))
    index = json.loads((model / "model_index.json").read_text())
    index["text_encoder"] = entry
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        QwenImageTextEncoder.from_pretrained(model)
    assert f"text_encoder = [{entry[0]!r}, {entry[1]!r}] is not supported" in str(e.value)
    assert "allowed: transformers ['Qwen2_5_VLForConditionalGeneration']" in str(e.value)


def test_a_damaged_text_encoder_is_a_checkpoint_error(qwen_tiny_dir, tmp_path):
    model = Path(shutil.copytree(qwen_tiny_dir, tmp_path / "model"))
    weights = model / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="text_encoder: cannot load Qwen2_5_VLForConditionalGeneration"):
        QwenImageTextEncoder.from_pretrained(model)


# ------------------------------------------------------------------------------------------------------- HSDP


def test_checkpoint_layout_and_the_sharded_loaders_renames(qwen_tiny_dir, encoder):
    """transformers 5 saves the legacy layout; the sharded loader maps every module parameter onto it (here on
    one process, without sharding: the same key lookup as the HSDP load)."""
    import transformers

    from omni_runtime.parallel.hsdp import hsdp_units
    from omni_runtime.stages.sharded_load import init_params_on_meta, load_sharded_weights

    component = qwen_tiny_dir / "text_encoder"
    with safe_open(str(component / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "visual.patch_embed.proj.weight" in keys
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in keys)
    full = encoder.text_encoder
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in full.state_dict()
    units = [name for name, _ in hsdp_units(full, HSDP_SHARD_CONDITIONS)]
    assert sorted(units) == ["model.language_model.layers.0", "model.language_model.layers.1", "model.visual"]

    cls = transformers.Qwen2_5_VLForConditionalGeneration
    config = cls.config_class.from_pretrained(str(component), local_files_only=True)
    with init_params_on_meta():
        model = cls(config)
    stats = load_sharded_weights(model, component, "model", device=torch.device("cpu"),
                                 key_renames=CHECKPOINT_RENAMES)
    assert stats.tensors == len(keys)
    want = full.state_dict()
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(CheckpointError, match="missing"):  # without the renames nothing of the LM is found
        with init_params_on_meta():
            bare = cls(config)
        load_sharded_weights(bare, component, "model", device=torch.device("cpu"))


def _hsdp_worker(rank: int, world_size: int, model_dir: str) -> dict:
    from omni_runtime.parallel.hsdp import HSDPInferenceConfig, local_parameter_bytes

    ref = QwenImageTextEncoder.from_pretrained(model_dir)
    want = ref.encode(PROMPTS)
    enc = QwenImageTextEncoder.from_pretrained(model_dir, hsdp=HSDPInferenceConfig(hsdp_shard_size=world_size))
    got = [enc.encode(PROMPTS), enc.encode(PROMPTS[:1], max_sequence_length=4)]  # the second on resharded weights
    rel = [float((g["prompt_embeds"] - w["prompt_embeds"]).abs().max() / w["prompt_embeds"].abs().max())
           for g, w in zip(got[0], want, strict=True)]
    rel.append(float((got[1][0]["prompt_embeds"] - want[0]["prompt_embeds"][:4]).abs().max()))
    shapes = [list(g["prompt_embeds"].shape) for g in got[0]] + [list(got[1][0]["prompt_embeds"].shape)]
    return {"rel": rel, "shapes": shapes, "want_shapes": [list(w["prompt_embeds"].shape) for w in want],
            "local": local_parameter_bytes(enc.text_encoder),
            "full": sum(p.numel() * p.element_size() for p in ref.text_encoder.parameters()),
            "units": sum(1 for m in enc.text_encoder.modules() if type(m).__name__.startswith("FSDP"))}


@pytest.mark.distributed
def test_hsdp_text_encoder_matches_unsharded(qwen_tiny_dir):
    from spawn import run_workers

    results = run_workers(_hsdp_worker, 2, args=(str(qwen_tiny_dir),), init_process_group=True, timeout=180)
    for r, res in enumerate(results):
        assert max(res["rel"]) <= 1e-5, (r, res["rel"])
        assert res["shapes"][:2] == res["want_shapes"] and res["shapes"][2] == [4, res["want_shapes"][0][1]]
        assert res["units"] == 2 + 1 + 1, res  # two decoder layers, the vision tower, the root
        assert res["local"] < 0.6 * res["full"], res
    assert sum(res["local"] for res in results) >= results[0]["full"]
