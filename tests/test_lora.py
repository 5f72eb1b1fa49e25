"""Per-request LoRA (issue 25, ``stages.lora``): equal to diffusers' ``load_lora_weights`` + ``set_adapters`` run
alone, also when requests with different adapter sets (and one without) share every step's forward; refusals.

Latents in-process: relative max error <= 1e-4 against diffusers' pipeline (``output_type="latent"``) for the
same embeddings, seed and steps, for both families (Flux and Qwen-Image tiny models).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from lora_refs import make_lora
from safetensors.torch import load_file, save_file

from omni_runtime.stages.denoiser import DenoiseRequest, DenoiserStage
from omni_runtime.stages.errors import RequestError
from omni_runtime.stages.lora import LoraError, LoraSpec, check_lora_file
from omni_runtime.stages.step_batch import RunningSet

LATENT_RTOL = 1e-4
H = W = 64
STEPS = 2


@pytest.fixture(scope="module")
def flux_loras(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    return {"a": make_lora(tiny_dir, d / "a.safetensors", seed=1, rank=4, alpha=8),
            "b": make_lora(tiny_dir, d / "b.safetensors", seed=2, rank=2, alpha=None),
            "c": make_lora(tiny_dir, d / "c.safetensors", seed=3, rank=8, alpha=4, targets=["to_q", "to_v", "ff.net.2"])}


@pytest.fixture(scope="module")
def qwen_loras(qwen_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("qwen_loras")
    return {"a": make_lora(qwen_tiny_dir, d / "a.safetensors", seed=4, rank=4, alpha=8, qwen=True),
            "b": make_lora(qwen_tiny_dir, d / "b.safetensors", seed=5, rank=2, alpha=None, qwen=True)}


def _embeds(config: dict, seed: int, tokens: int, pooled: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": torch.randn(tokens, config["joint_attention_dim"], generator=g)}
    if pooled:
        out["pooled_prompt_embeds"] = torch.randn(config["pooled_projection_dim"], generator=g)
    return out


def _reference(pipe, loras: dict[str, Path], adapters: list[tuple[str, float]], embeds: dict, neg: dict | None,
               seed: int, cfg: float, qwen: bool) -> torch.Tensor:
    """diffusers alone: ``set_adapters(names, weights)`` (or LoRA disabled), latents of one request."""
    if adapters:
        pipe.enable_lora()
        pipe.set_adapters([n for n, _ in adapters], [w for _, w in adapters])
    else:
        pipe.disable_lora()
    kw = {"prompt_embeds": embeds["prompt_embeds"][None]}
    if qwen:
        kw["prompt_embeds_mask"] = torch.ones(1, embeds["prompt_embeds"].shape[0], dtype=torch.long)
        if neg is not None:
            kw["negative_prompt_embeds"] = neg["prompt_embeds"][None]
            kw["negative_prompt_embeds_mask"] = torch.ones(1, neg["prompt_embeds"].shape[0], dtype=torch.long)
    else:
        kw["pooled_prompt_embeds"] = embeds["pooled_prompt_embeds"][None]
        if neg is not None:
            kw["negative_prompt_embeds"] = neg["prompt_embeds"][None]
            kw["negative_pooled_prompt_embeds"] = neg["pooled_prompt_embeds"][None]
    out = pipe(**kw, height=H, width=W, num_inference_steps=STEPS, true_cfg_scale=cfg,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    return out[0]


def _parity(model_dir: Path, loras: dict[str, Path], sets: list[list[tuple[str, float]]], qwen: bool) -> list[float]:
    """Requests with adapter sets ``sets`` (the second one with true CFG) denoised together in one running set
    of our stage, each against diffusers run alone; returns the relative errors."""
    from diffusers import FluxPipeline, QwenImagePipeline

    stage = DenoiserStage.from_pretrained(model_dir)
    pipe = (QwenImagePipeline if qwen else FluxPipeline).from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name, path in loras.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    reqs, refs = [], []
    for i, adapters in enumerate(sets):
        embeds = _embeds(stage.config, 10 + i, 7, pooled=not qwen)
        neg = _embeds(stage.config, 50 + i, 7, pooled=not qwen) if i == 1 else None
        cfg = 2.0 if neg is not None else 1.0
        specs = tuple(LoraSpec(n, str(loras[n]), 0, w) for n, w in adapters)
        full = dict(embeds, **({f"negative_{k}": v for k, v in neg.items()} if neg else {}))
        reqs.append(DenoiseRequest(embeds=full, seed=100 + i, height=H, width=W, num_inference_steps=STEPS,
                                   true_cfg_scale=cfg, lora=specs))
        refs.append(_reference(pipe, loras, adapters, embeds, neg, 100 + i, cfg, qwen))
    ours = stage.denoise(reqs)
    errs = []
    for lat, ref in zip(ours, refs, strict=True):
        ref = ref.reshape(lat.shape)
        errs.append(((lat - ref).abs().max() / ref.abs().max()).item())
    plain = stage.denoise([DenoiseRequest(embeds=reqs[0].embeds, seed=100, height=H, width=W,
                                          num_inference_steps=STEPS)])[0]
    assert ((plain - ours[0]).abs().max() / plain.abs().max()).item() > 1e-3  # the adapter changes the result
    return errs


SETS = [[("a", 1.0)], [("b", 0.7), ("c", -0.5)], [("a", 0.5), ("b", 1.2), ("c", 0.8)], [], [("c", 1.3)]]


def test_flux_mixed_adapter_sets_in_one_running_set_match_diffusers(tiny_dir: Path, flux_loras: dict) -> None:
    errs = _parity(tiny_dir, flux_loras, SETS, qwen=False)
    print("flux latent rel errors vs diffusers:", errs)
    assert max(errs) <= LATENT_RTOL, errs


def test_qwen_image_adapter_sets_match_diffusers(qwen_tiny_dir: Path, qwen_loras: dict) -> None:
    errs = _parity(qwen_tiny_dir, qwen_loras, [[("a", 0.8)], [("a", 0.5), ("b", 1.0)], [], [("b", -0.6)]],
                   qwen=True)
    print("qwen-image latent rel errors vs diffusers:", errs)
    assert max(errs) <= LATENT_RTOL, errs


def test_bad_adapter_files_are_refused_by_name(tiny_dir: Path, qwen_tiny_dir: Path, flux_loras: dict,
                                               qwen_loras: dict, tmp_path: Path) -> None:
    assert check_lora_file(flux_loras["a"], tiny_dir)["layers"] > 0
    with pytest.raises(LoraError, match="not a linear layer of this model|do not fit"):
        check_lora_file(qwen_loras["a"], tiny_dir)  # another model's adapter
    sd = load_file(flux_loras["c"])
    k = next(k for k in sd if k.endswith("lora_A.weight"))
    save_file({**sd, k: torch.zeros(sd[k].shape[0], sd[k].shape[1] + 1)}, tmp_path / "shape.safetensors")
    with pytest.raises(LoraError, match="do not fit|rank"):
        check_lora_file(tmp_path / "shape.safetensors", tiny_dir)
    (tmp_path / "corrupt.safetensors").write_bytes(flux_loras["a"].read_bytes()[:200])
    with pytest.raises(LoraError, match="corrupt"):
        check_lora_file(tmp_path / "corrupt.safetensors", tiny_dir)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 4)},
              tmp_path / "kohya.safetensors")
    with pytest.raises(LoraError, match="kohya"):
        check_lora_file(tmp_path / "kohya.safetensors", tiny_dir)
    save_file({**sd, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4)},
              tmp_path / "te.safetensors")
    with pytest.raises(LoraError, match="text-encoder"):
        check_lora_file(tmp_path / "te.safetensors", tiny_dir)
    with pytest.raises(LoraError, match="no such file"):
        check_lora_file(tmp_path / "missing.safetensors", tiny_dir)
    # a rank refuses the request at admit (RequestError: a 400), the running set goes on
    stage = DenoiserStage.from_pretrained(tiny_dir)
    req = DenoiseRequest(embeds=_embeds(stage.config, 0, 5, True), height=H, width=W, num_inference_steps=1,
                         lora=(LoraSpec("q", str(qwen_loras["a"])),))
    with pytest.raises(RequestError, match="lora 'q'"):
        stage.denoise([req])


def test_lru_cap_and_pipeline_stage_holds_only_its_layers(tiny_dir: Path, flux_loras: dict) -> None:
    from omni_runtime.parallel.strategies.pipeline_parallel import partition_model
    from omni_runtime.stages.lora import LoraBank

    stage = DenoiserStage.from_pretrained(tiny_dir, lora_max_loaded=2)
    bank = stage.lora
    a, b, c = (LoraSpec(n, str(flux_loras[n])) for n in "abc")
    held_a = bank.get(a)
    bank.get(b)
    assert bank.get(a) is held_a and bank.loads == 2  # cached
    bank.get(c)  # over the cap: b, the least recently used, leaves
    assert [k[0] for k in bank.cache] == ["a", "c"] and bank.loads == 3
    bank.get(b)
    assert [k[0] for k in bank.cache] == ["c", "b"] and bank.loads == 4
    # an adapter a running request uses is not evicted: with c pinned, loading a evicts b, not c
    bank.pin([bank.get(c)])
    bank.get(a)
    assert [k[0] for k in bank.cache] == ["c", "a"]
    bank.get(b)  # both others in use? no: a is unused, so a leaves
    assert [k[0] for k in bank.cache] == ["c", "b"]
    bank.pin([bank.cache[b.key]])
    bank.get(a)  # c and b in use: a third stays loaded until one is unpinned
    assert len(bank.cache) == 3
    bank.unpin([bank.cache[c.key]])
    assert [k[0] for k in bank.cache] == ["b", "a"]
    # the running set pins a request's adapters while it runs and unpins them when it leaves
    stage.lora.pins.clear()
    req = DenoiseRequest(embeds=_embeds(stage.config, 0, 5, True), height=H, width=W, num_inference_steps=1,
                         lora=(a, b))
    running = stage.lora.pins
    rs = RunningSet(stage)
    rs.admit(7, req)
    assert running == {a.key: 1, b.key: 1}
    assert list(rs.step()) == [7] and running == {}  # its last step: it left, unpinned
    full = set(held_a.layers)
    # a pipeline stage keeps the layers it holds only (here stage 1 of 2: the later blocks and the head)
    model = partition_model(DenoiserStage.from_pretrained(tiny_dir).model, 1, 2)
    part = LoraBank(model, torch.float32, torch.device("cpu")).get(a)
    held = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(part.layers) == {m for m in full if m in held} and 0 < len(part.layers) < len(full)
    assert "x_embedder" in full and "x_embedder" not in part.layers


def test_request_field_and_cli_flag() -> None:
    from omni_runtime.runtime.requests import (
        FIELDS,
        RequestError,
        lora_flag,
        openapi_request_schema,
        parse_request,
    )

    req = parse_request({"prompt": "x", "lora": [{"name": "a", "scale": 0.5}, {"name": "b.v2"}]})
    assert [(r.name, r.scale) for r in req.lora] == [("a", 0.5), ("b.v2", 1.0)]
    assert parse_request({"prompt": "x"}).lora == ()
    twice = parse_request({"prompt": "x", "lora": [{"name": "a", "scale": 0.5}, {"name": "a", "scale": 0.25}]})
    assert [(r.name, r.scale) for r in twice.lora] == [("a", 0.5), ("a", 0.25)]  # the running set adds them
    for bad, what in [({"name": "a"}, "must be a list"),
                      ([{"name": "-x"}], "adapter name"), ([{"name": "a", "scale": 1e9}], "scale"),
                      ([{"name": "a", "weight": 1}], "keys"), ([{"name": str(i)} for i in range(9)], "at most 8")]:
        with pytest.raises(RequestError, match=what) as e:
            parse_request({"prompt": "x", "lora": bad})
        assert e.value.param == "lora"
    assert lora_flag("style:0.8") == {"name": "style", "scale": 0.8} and lora_flag("style") == {"name": "style"}
    with pytest.raises(RequestError, match="NAME:SCALE"):
        lora_flag("style:big")
    schema = openapi_request_schema()["properties"]["lora"]
    assert schema["maxItems"] == 8 and schema["items"]["required"] == ["name"]
    assert FIELDS["lora"].cli_flag == "--lora"
    from omni_runtime.runtime.cli import build_parser

    args = build_parser().parse_args(["generate", "--config", "c.toml", "--prompt", "x", "-o", "o.png",
                                      "--lora", "style:0.8", "--lora", "detail"])
    assert args.lora == [{"name": "style", "scale": 0.8}, {"name": "detail"}]
    assert parse_request({"prompt": "x", "lora": args.lora}).lora[1].scale == 1.0


def test_lora_config_section(tmp_path: Path) -> None:
    from omni_runtime.runtime.config import ConfigError, config_from_dict

    cfg = config_from_dict({"model": {"path": "m"}, "lora": {"adapters": {"style": "l/s.safetensors"},
                                                             "max_loaded": 3, "allowed_roots": ["l"]}},
                           base_dir=tmp_path)
    assert cfg.lora.adapters == {"style": str(tmp_path / "l" / "s.safetensors")}
    assert cfg.lora.allowed_roots == [str(tmp_path / "l")] and cfg.lora.max_loaded == 3
    assert config_from_dict({"model": {"path": "m"}}).lora.max_loaded == 8
    for lora, what in [({"max_loaded": 0}, "lora.max_loaded"), ({"adapters": {"-x": "a"}}, "lora.adapters.-x"),
                       ({"adapters": ["a"]}, "lora.adapters"), ({"allowed_roots": "a"}, "lora.allowed_roots"),
                       ({"cap": 1}, "lora.cap: unknown key")]:
        with pytest.raises(ConfigError, match=re.escape(what)):
            config_from_dict({"model": {"path": "m"}, "lora": lora})
