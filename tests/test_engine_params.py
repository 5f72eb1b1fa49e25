"""The engines' request seam (``stages.engine.RequestParams``): the runtime's request type has every field the
engines read, the engines read them from the request (no defaults of their own), and a request type that lacks one
fails loudly instead of running with a silent default."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from omni_runtime.runtime.requests import GenerationRequest, LoraRef
from omni_runtime.stages.cache_config import CacheConfig
from omni_runtime.stages.engine import DenoiserEngine, LoraParams, RequestParams, StageItem


def test_the_request_type_has_every_field_the_engines_read():
    assert set(RequestParams.__annotations__) <= set(GenerationRequest.__struct_fields__)
    assert set(LoraParams.__annotations__) <= set(LoraRef.__struct_fields__)


def test_the_denoisers_view_of_a_request_takes_each_field_from_the_request():
    cache = CacheConfig(threshold=0.1)
    req = GenerationRequest(prompt="x", negative_prompt="n", width=64, height=32, num_inference_steps=4,
                            guidance_scale=2.5, true_cfg_scale=3.0, true_cfg_scale_2=1.5, num_frames=5,
                            lora=(LoraRef(name="a", path="/a.safetensors", version=2, scale=0.5),), cache=cache,
                            partial_images=1)
    embeds = {"prompt_embeds": torch.zeros(2, 4), "negative_prompt_embeds": torch.ones(2, 4)}
    d = DenoiserEngine.request(StageItem(req, 7, embeds))
    assert (d.seed, d.width, d.height, d.num_inference_steps) == (7, 64, 32, 4)
    assert (d.guidance_scale, d.true_cfg_scale, d.true_cfg_scale_2, d.num_frames) == (2.5, 3.0, 1.5, 5)
    assert [(s.name, s.path, s.version, s.scale) for s in d.lora] == [("a", "/a.safetensors", 2, 0.5)]
    assert d.cache is cache and d.previews == (2,)
    assert set(d.embeds) == {"prompt_embeds", "negative_prompt_embeds"}  # true CFG keeps the negative branch


#: the fields the engines once required (no ``num_frames``, ``lora``, ``cache``, ...)
_OLD_FIELDS = ("prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale",
               "true_cfg_scale")


def test_a_request_type_without_a_field_the_engines_read_fails_instead_of_a_silent_default():
    old = SimpleNamespace(**{f: getattr(GenerationRequest(prompt="x"), f) for f in _OLD_FIELDS})
    with pytest.raises(AttributeError, match="true_cfg_scale_2|num_frames|lora|cache|partial_images"):
        DenoiserEngine.request(StageItem(old, 0, {"prompt_embeds": torch.zeros(2, 4)}))  # type: ignore[arg-type]
