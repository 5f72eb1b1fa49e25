"""A request that leaves a field out gets the served family's pipeline default (``ModelFamily.request_defaults``):
Qwen-Image's 50 steps and ``true_cfg_scale`` 4.0, not Flux's 28 and 1.0.

Checked against diffusers' own ``__call__`` signature of every registered family's pipeline (so a new family, or a
diffusers that changes a default, fails here), and on every path that reads a request: ``parse_served`` (the HTTP
edge, ``Omni.generate``), the CLI's flags, ``batch`` lines, edits, the work caps and the OpenAPI schema. The image a
defaulted request gets is checked against diffusers through ``serve`` in tests/test_qwen_image_serving.py (its
true-CFG request gives no ``true_cfg_scale``).
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import pytest

from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.requests import (
    FIELDS,
    RequestError,
    WorkCaps,
    openapi_request_schema,
    parse_request,
)
from omni_runtime.runtime.served_model import defaults_of, parse_served, served_model
from omni_runtime.runtime.video_request import VIDEO_FIELDS
from omni_runtime.stages.models.family import REGISTRY, family_for_class

#: request fields that are parameters of the diffusers pipelines' ``__call__``
PIPELINE_FIELDS = ("num_inference_steps", "guidance_scale", "true_cfg_scale", "guidance_scale_2")


@pytest.mark.parametrize("pipeline", sorted(REGISTRY))
def test_every_familys_defaults_are_its_diffusers_pipelines(pipeline: str) -> None:
    import diffusers

    family = family_for_class(pipeline, "test")
    params = inspect.signature(getattr(diffusers, pipeline).__call__).parameters
    table = VIDEO_FIELDS if family.video else FIELDS
    assert set(family.request_defaults) <= set(table), family.request_defaults
    parse_request({"prompt": "x", **family.request_defaults})  # each default is a value the field allows
    compared = 0
    for name in PIPELINE_FIELDS:
        if name not in table or name not in params or params[name].default is None:
            continue  # not a field here, or diffusers derives it (e.g. Qwen-Image's guidance_scale: unused)
        ours = family.request_defaults.get(name, table[name].default)
        assert ours == params[name].default, (pipeline, name, ours, params[name].default)
        compared += 1
    assert compared >= 2, (pipeline, compared)
    if family.request_defaults:  # `omni-runtime check` lists them
        assert any(line.startswith("  request defaults") for line in family.describe()), family.describe()


def test_parse_served_fills_the_familys_defaults_and_the_caps_see_them(tiny_dir: Path,
                                                                       qwen_tiny_dir: Path) -> None:
    qwen, flux = served_model(str(qwen_tiny_dir)), served_model(str(tiny_dir))
    req = parse_served({"prompt": "x"}, qwen)
    assert (req.num_inference_steps, req.true_cfg_scale) == (50, 4.0)
    req = parse_served({"prompt": "x", "num_inference_steps": 3, "true_cfg_scale": 1.0}, qwen)  # given values win
    assert (req.num_inference_steps, req.true_cfg_scale) == (3, 1.0)
    req = parse_served({"prompt": "x", "num_inference_steps": None}, qwen)  # null is absent
    assert req.num_inference_steps == 50
    req = parse_served({"prompt": "x"}, flux)
    assert (req.num_inference_steps, req.true_cfg_scale, req.guidance_scale) == (28, 1.0, 3.5)
    caps = WorkCaps(max_pixels_steps=256 * 256 * 40)  # Flux's default 28 steps fit, Qwen-Image's 50 do not
    parse_served({"prompt": "x", "size": "256x256"}, flux, caps=caps)
    with pytest.raises(RequestError) as e:
        parse_served({"prompt": "x", "size": "256x256"}, qwen, caps=caps)
    assert e.value.param == "num_inference_steps" and "x 50 =" in str(e.value)


def test_the_schema_shows_the_served_familys_defaults(qwen_tiny_dir: Path) -> None:
    props = openapi_request_schema(defaults_of(served_model(str(qwen_tiny_dir))))["properties"]
    assert (props["num_inference_steps"]["default"], props["true_cfg_scale"]["default"]) == (50, 4.0)
    props = openapi_request_schema()["properties"]
    assert (props["num_inference_steps"]["default"], props["true_cfg_scale"]["default"]) == (28, 1.0)
    assert defaults_of(None) == {}


def test_cli_flags_and_batch_lines_get_the_familys_defaults(qwen_tiny_dir: Path, tmp_path: Path) -> None:
    from omni_runtime.runtime.offline import read_prompts, request_from_args

    cfg = config_from_dict({"model": {"path": str(qwen_tiny_dir)}})
    fields = {f.name: None for f in FIELDS.values() if f.cli_flag}
    req = request_from_args(argparse.Namespace(**{**fields, "prompt": "a barn"}), "png", cfg=cfg)
    assert (req.num_inference_steps, req.true_cfg_scale) == (50, 4.0)
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"prompt": "a barn"}\n{"prompt": "a cat", "num_inference_steps": 4}\n')
    got = [r for _, r in read_prompts(lines, cfg=cfg)]
    assert [r.num_inference_steps for r in got] == [50, 4] and got[0].true_cfg_scale == 4.0


def test_edits_get_the_familys_defaults() -> None:
    import io

    from PIL import Image

    from omni_runtime.runtime.edit_requests import edit_rules, parse_edit_request

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    model = Path(__file__).resolve().parents[1] / "models" / "tiny-qwen-image-edit"  # made on first use
    rules = edit_rules(config_from_dict({"model": {"path": str(model)}}))
    req = parse_edit_request({"prompt": "make it blue"}, [buf.getvalue()], rules)
    assert (req.num_inference_steps, req.true_cfg_scale) == (50, 4.0)
