"""The model-family seam (stages/models/family.py): which family a directory is, what ``check`` says about it, the
directories we do not serve (refused by name, never served as another model), the parallel modes a family refuses,
and Qwen-Image in-process (the same engines as ``serve``) against diffusers' ``QwenImagePipeline``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_runtime.runtime.cli import main
from omni_runtime.stages.errors import CheckpointError
from omni_runtime.stages.guidance import TRUE_CFG_NORM
from omni_runtime.stages.model_check import check_model_dir
from omni_runtime.stages.models.family import family_of

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, model: Path, extra: str = "") -> Path:
    p = tmp_path / "c.toml"
    p.write_text(f'[model]\npath = "{model}"\n[server]\nport = 0\n{extra}')
    return p


def _check(capsys, cfg: Path) -> tuple[int, str]:
    code = main(["check", str(cfg)])
    out = capsys.readouterr()
    return code, out.err if code else out.out


def test_each_directory_gets_its_family(tiny_dir: Path, qwen_tiny_dir: Path) -> None:
    assert family_of(tiny_dir).name == "flux"
    assert family_of(qwen_tiny_dir).name == "qwen_image"
    assert len(check_model_dir(qwen_tiny_dir)) == 5  # tokenizer, text_encoder, transformer, vae, scheduler


def test_check_prints_the_family_components_modes_and_fields(tmp_path, qwen_tiny_dir, capsys) -> None:
    code, out = _check(capsys, _config(tmp_path, qwen_tiny_dir))
    assert code == 0, out
    assert "family: qwen_image (pipeline QwenImagePipeline)" in out
    assert "transformer: QwenImageTransformer2DModel" in out and "text_encoder: Qwen2_5_VLForConditionalGeneration" in out
    assert "parallel modes: ulysses, ring, cfg, pp, hsdp_shard, vae_patch" in out  # tests/test_qwen_vae_patch.py
    assert "not supported: vae_patch" not in out
    assert "request field guidance_scale: ignored" in out


def _pipeline_dir(tmp_path: Path, class_name: str | None, **entries: object) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    index = {"_diffusers_version": "0.35.0", **entries}
    if class_name is not None:
        index["_class_name"] = class_name
    (model / "model_index.json").write_text(json.dumps(index))
    return model


@pytest.mark.parametrize(("class_name", "entries", "match"), [
    ("WanImageToVideoPipeline", {"boundary_ratio": None, "transformer": ["diffusers", "WanTransformer3DModel"]},
     r"_class_name = 'WanImageToVideoPipeline' is an image-to-video model .*not served yet; supported pipeline "
     r"classes: FluxKontextPipeline, FluxPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline, "
     r"WanPipeline"),
    ("StableDiffusionPipeline", {}, r"_class_name = 'StableDiffusionPipeline' is not a supported pipeline class; "
                                    r"supported: FluxKontextPipeline, FluxPipeline, QwenImageEditPipeline, "
                                    r"QwenImageEditPlusPipeline, QwenImagePipeline, WanPipeline"),
    (None, {}, r"_class_name = None is not a supported pipeline class"),
])
def test_unserved_pipelines_are_refused_by_name(tmp_path, capsys, class_name, entries, match) -> None:
    model = _pipeline_dir(tmp_path, class_name, **entries)
    with pytest.raises(CheckpointError, match=match):
        check_model_dir(model)
    code, err = _check(capsys, _config(tmp_path, model))
    assert code == 2 and err.count("\n") == 1, err
    assert "model_index.json: _class_name" in err


def test_a_qwen_directory_missing_a_component_names_the_family_and_what_it_needs(tmp_path, qwen_tiny_dir) -> None:
    model = tmp_path / "qwen"
    shutil.copytree(qwen_tiny_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    del index["vae"]
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"component\(s\) \['vae'\] not listed; the qwen_image family "
                                              r"\(QwenImagePipeline\) needs \['tokenizer', 'text_encoder', "):
        check_model_dir(model)


def test_a_text_encoder_of_another_family_is_refused(tmp_path, qwen_tiny_dir) -> None:
    model = tmp_path / "qwen"
    shutil.copytree(qwen_tiny_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "T5EncoderModel"]
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"text_encoder = \['transformers', 'T5EncoderModel'\] is not supported; "
                                              r"allowed: transformers \['Qwen2_5_VLForConditionalGeneration'\]"):
        check_model_dir(model)


@pytest.mark.parametrize(("extra", "key", "mode"), [
    ('[stages.denoiser.parallel]\npp = 2\npp_mode = "pipefusion"\n', "stages.denoiser.parallel.pp_mode = 'pipefusion'",
     "pipefusion"),
    ("[stages.denoiser]\nmixed_sizes = true\n", "stages.denoiser.mixed_sizes = true", "mixed_sizes"),
])
def test_a_mode_the_family_cannot_run_is_a_config_error_with_the_reason(tmp_path, qwen_tiny_dir, capsys, extra, key,
                                                                          mode) -> None:
    code, err = _check(capsys, _config(tmp_path, qwen_tiny_dir, extra))
    assert code == 2 and err.count("\n") == 1, err
    assert f"{key}: the qwen_image family (QwenImagePipeline) does not support {mode}: " in err


def test_the_embedded_qwen_model_still_to_make_is_checked_by_its_preset(tmp_path, capsys) -> None:
    cfg = tmp_path / "configs" / "qwen_image.toml"
    cfg.parent.mkdir()
    cfg.write_text((ROOT / "configs" / "qwen_image.toml").read_text()
                   .replace("[stages.denoiser.parallel]\nulysses = 1\nring = 1\ncfg = 1\npp = 1",
                            "[stages.denoiser.parallel]\nulysses = 1\nring = 1\ncfg = 1\npp = 2"))
    code, out = _check(capsys, cfg)
    assert code == 0, out
    assert "missing: the embedded tiny QwenImagePipeline model is created there on first use" in out
    assert "pp stages (2 blocks: 2 transformer_blocks):" in out and "family: qwen_image" in out
    assert not (tmp_path / "models").exists()  # check made nothing


def test_true_cfg_norm_is_qwen_image_pipelines_combine() -> None:
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 6, 64, generator=g, dtype=torch.float64).unbind(0)
    comb = uncond + 4.0 * (cond - uncond)  # QwenImagePipeline.__call__'s lines, in float64
    want = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    got = TRUE_CFG_NORM.combine([cond, uncond], [4.0])
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert torch.allclose(got.norm(dim=-1), cond.norm(dim=-1))  # the rescale: the conditional norm per token


@pytest.mark.slow
def test_in_process_qwen_image_equals_diffusers_with_text_of_several_lengths(qwen_tiny_dir) -> None:
    """Omni(in_process=True) runs the same engines as serve: n = 2 images of one request and a CFG request share
    the denoiser's steps, each row's text padded to the longest and masked; every image equals diffusers'."""
    from diffusers import QwenImagePipeline

    from omni_runtime.runtime import Omni
    from omni_runtime.runtime.config_load import config_from_dict

    pipe = QwenImagePipeline.from_pretrained(str(qwen_tiny_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    reqs = [dict(prompt="a lighthouse at dusk", seed=11, n=2),
            dict(prompt="a bowl of ripe lemons on a wooden table", negative_prompt="dark, low quality",
                 true_cfg_scale=3.0, seed=4, n=1)]
    with Omni(config_from_dict({"model": {"path": str(qwen_tiny_dir)}}), in_process=True) as omni:
        futures = [omni.submit(omni_request(r)) for r in reqs]
        served = [f.result() for f in futures]
    from omni_runtime.runtime.images import decode_image

    for r, images in zip(reqs, served, strict=True):
        for i, png in enumerate(images):
            ours = np.asarray(decode_image(png))
            kw = {k: r[k] for k in ("prompt", "negative_prompt", "true_cfg_scale") if k in r}
            ref = np.asarray(pipe(**{"true_cfg_scale": 1.0, **kw}, width=80, height=48, num_inference_steps=3,
                                  generator=torch.Generator("cpu").manual_seed(r["seed"] + i)).images[0])
            assert ours.shape == ref.shape == (48, 80, 3)
            assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2, (r, i)


def omni_request(fields: dict):
    from omni_runtime.runtime.requests import parse_request

    return parse_request({**fields, "size": "80x48", "num_inference_steps": 3})
