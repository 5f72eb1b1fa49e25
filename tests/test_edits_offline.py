"""Edits outside HTTP: the denoiser's running set shares a forward between an edit and a generation where their
join keys allow (mixed sizes), ``Omni.edit``, ``omni-runtime generate --image`` and a ``batch`` line with ``image``
(all in process, the tiny FLUX.1-Kontext model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from image_bytes import png
from PIL import Image

from omni_runtime.runtime.cli import main
from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.stages.denoiser import DenoiseRequest, DenoiserStage
from omni_runtime.stages.engine import TextEncoderEngine
from omni_runtime.stages.models.family import CONDITION_KEY
from omni_runtime.stages.step_batch import RunningSet
from omni_runtime.stages.vae import VaeDecoderStage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory) -> Path:
    from omni_runtime.stages.models.family import family_for_class

    return family_for_class("FluxKontextPipeline").make_tiny(tmp_path_factory.mktemp("kontext") / "m", "tiny")


def _requests(model: Path) -> tuple[DenoiseRequest, DenoiseRequest]:
    text = TextEncoderEngine.load(model, "float32", "cpu").encoder.encode(["make it blue", "a red fox"])
    z = VaeDecoderStage.from_pretrained(model).encode_image(png(56, 40))
    edit = DenoiseRequest(embeds={**text[0], CONDITION_KEY: z}, seed=3, height=32, width=48, num_inference_steps=3)
    gen = DenoiseRequest(embeds=text[1], seed=4, height=32, width=32, num_inference_steps=2)
    return edit, gen


@pytest.mark.parametrize("mixed_sizes", [True, False])
def test_an_edit_and_a_generation_share_the_running_set(kontext_dir, mixed_sizes) -> None:
    stage = DenoiserStage.from_pretrained(kontext_dir, mixed_sizes=mixed_sizes)
    edit, gen = _requests(kontext_dir)
    solo = [stage.denoise([r])[0] for r in (edit, gen)]
    calls = []
    forward = stage.forward_rows

    def counted(model, row_args, shared, info):
        calls.append(row_args["hidden_states"].shape)
        return forward(model, row_args, shared, info)

    stage.forward_rows = counted
    running = RunningSet(stage)
    running.admit(1, edit)
    running.admit(2, gen)
    out = {}
    while running:
        out.update(running.step())
    # the edit: 6 image + 6 condition tokens; the generation: 4 image tokens, padded to 12 and masked
    if mixed_sizes:
        assert calls == [torch.Size([2, 12, 64])] * 2 + [torch.Size([1, 12, 64])]
    else:  # other join keys (size, condition): one forward each per step
        assert sorted(calls) == sorted([torch.Size([1, 12, 64])] * 3 + [torch.Size([1, 4, 64])] * 2)
    for got, want in zip((out[1], out[2]), solo, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_omni_edit_cli_generate_image_and_batch_lines_agree(kontext_dir, tmp_path, capsys) -> None:
    from omni_runtime.runtime.omni import Omni

    src = tmp_path / "in.png"
    src.write_bytes(png(56, 40))
    cfg = config_from_dict({"model": {"path": str(kontext_dir)}})
    with Omni(cfg, in_process=True) as omni:
        ours = np.asarray(omni.edit("make it blue", str(src), seed=5, num_inference_steps=2)[0])
        with pytest.raises(ValueError, match="mask: the model .* has no inpainting"):
            omni.edit("x", Image.open(src), mask=src.read_bytes())
    assert ours.shape == (32, 48, 3)  # size auto: 56x40 rounded down to 16
    conf = tmp_path / "c.toml"
    conf.write_text(f'[model]\npath = "{kontext_dir}"\n')
    out = tmp_path / "out.png"
    assert main(["generate", "--config", str(conf), "--in-process", "--prompt", "make it blue", "--image", str(src),
                 "--seed", "5", "--steps", "2", "-o", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), ours)
    lines = tmp_path / "edits.jsonl"
    lines.write_text(json.dumps({"prompt": "make it blue", "image": "in.png", "seed": 5, "num_inference_steps": 2})
                     + "\n" + json.dumps({"prompt": "a fox", "seed": 1, "num_inference_steps": 2, "size": "32x32"})
                     + "\n")
    assert main(["batch", "--config", str(conf), "--in-process", str(lines), "--out-dir", str(tmp_path / "b")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "00001.png")), ours)
    assert Image.open(tmp_path / "b" / "00002.png").size == (32, 32)
    lines.write_text(json.dumps({"prompt": "x", "image": "missing.png"}) + "\n")
    assert main(["batch", "--config", str(conf), "--in-process", str(lines), "--out-dir", str(tmp_path / "c")]) == 2
    assert "line 1: image=" in capsys.readouterr().err
