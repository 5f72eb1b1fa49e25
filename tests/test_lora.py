"""Per-request LoRA (issue 25, ``stages.lora``): equal to diffusers' ``load_lora_weights`` + ``set_adapters`` run
alone, also when requests with different adapter sets (and one without) share every step's forward; refusals.

Latents in-process: relative max error <= 1e-4 against diffusers' pipeline (``output_type="latent"``) for the
same embeddings, seed and steps, for both families (Flux and Qwen-Image tiny models), for a kohya-layout file
(converted by diffusers' ``FluxPipeline.lora_state_dict``) and with mixed image sizes in one padded forward; Ulysses
2 on gloo equals the single process. ``[lora] adapters`` are preloaded on the denoiser rank at start.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from lora_refs import KOHYA_TARGETS, make_lora, to_kohya_flux
from safetensors.torch import load_file, save_file

from omni_runtime.stages.denoiser import DenoiseRequest, DenoiserStage
from omni_runtime.stages.errors import RequestError
from omni_runtime.stages.lora import LoraSpec
from omni_runtime.stages.lora_files import LoraError, check_lora_file
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
               seed: int, cfg: float, qwen: bool, h: int = H, w: int = W) -> torch.Tensor:
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
    out = pipe(**kw, height=h, width=w, num_inference_steps=STEPS, true_cfg_scale=cfg,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    return out[0]


def _requests(config: dict, loras: dict[str, Path], sets: list[list[tuple[str, float]]], qwen: bool,
              sizes: list[tuple[int, int]] | None = None) -> list[tuple[DenoiseRequest, dict, dict | None]]:
    """One request per adapter set (the second one with true CFG; ``sizes``: each one's height and width), with
    its embeddings and negative ones."""
    out = []
    for i, adapters in enumerate(sets):
        h, w = sizes[i] if sizes else (H, W)
        embeds = _embeds(config, 10 + i, 7, pooled=not qwen)
        neg = _embeds(config, 50 + i, 7, pooled=not qwen) if i == 1 else None
        cfg = 2.0 if neg is not None else 1.0
        specs = tuple(LoraSpec(n, str(loras[n]), 0, wt) for n, wt in adapters)
        full = dict(embeds, **({f"negative_{k}": v for k, v in neg.items()} if neg else {}))
        out.append((DenoiseRequest(embeds=full, seed=100 + i, height=h, width=w, num_inference_steps=STEPS,
                                   true_cfg_scale=cfg, lora=specs), embeds, neg))
    return out


def _run_together(stage: DenoiserStage, reqs: list[DenoiseRequest]) -> list[torch.Tensor]:
    """The requests admitted into one running set (what serving does): rows of one join key share each step's
    forward, whatever their adapters and CFG. Returns their packed latents in order."""
    rs = RunningSet(stage)
    for i, req in enumerate(reqs):
        rs.admit(i, req)
    out: dict[int, torch.Tensor] = {}
    while rs:
        out.update(rs.step())
    return [out[i] for i in range(len(reqs))]


def _parity(model_dir: Path, loras: dict[str, Path], sets: list[list[tuple[str, float]]], qwen: bool,
            sizes: list[tuple[int, int]] | None = None, forwards: list | None = None, **stage_kw) -> list[float]:
    """Requests with adapter sets ``sets`` (the second one with true CFG; ``sizes``: each one's height and width)
    denoised together in one running set of our stage, each against diffusers run alone; returns the relative
    errors. ``forwards``: gets the row count of each forward of the shared run."""
    from diffusers import FluxPipeline, QwenImagePipeline

    stage = DenoiserStage.from_pretrained(model_dir, **stage_kw)
    pipe = (QwenImagePipeline if qwen else FluxPipeline).from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name, path in loras.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    reqs, refs = [], []
    for (req, embeds, neg), adapters in zip(_requests(stage.config, loras, sets, qwen, sizes), sets, strict=True):
        reqs.append(req)
        refs.append(_reference(pipe, loras, adapters, embeds, neg, req.seed, req.true_cfg_scale, qwen,
                               req.height, req.width))
    hook = stage.model.register_forward_pre_hook(
        lambda _m, args, kwargs: forwards.append(kwargs["hidden_states"].shape[0]) if forwards is not None else None,
        with_kwargs=True)
    ours = _run_together(stage, reqs)
    hook.remove()
    errs = []
    for lat, ref in zip(ours, refs, strict=True):
        ref = ref.reshape(lat.shape)
        errs.append(((lat - ref).abs().max() / ref.abs().max()).item())
    plain = stage.denoise([DenoiseRequest(embeds=reqs[0].embeds, seed=100, height=reqs[0].height,
                                          width=reqs[0].width, num_inference_steps=STEPS)])[0]
    assert ((plain - ours[0]).abs().max() / plain.abs().max()).item() > 1e-3  # the adapter changes the result
    return errs


SETS = [[("a", 1.0)], [("b", 0.7), ("c", -0.5)], [("a", 0.5), ("b", 1.2), ("c", 0.8)], [], [("c", 1.3)]]


def test_flux_mixed_adapter_sets_in_one_running_set_match_diffusers(tiny_dir: Path, flux_loras: dict) -> None:
    forwards: list[int] = []
    errs = _parity(tiny_dir, flux_loras, SETS, qwen=False, forwards=forwards)
    print("flux latent rel errors vs diffusers:", errs)
    assert forwards == [len(SETS) + 1] * STEPS, forwards  # every row (CFG's two included) in each step's forward
    assert max(errs) <= LATENT_RTOL, errs


def test_qwen_image_adapter_sets_match_diffusers(qwen_tiny_dir: Path, qwen_loras: dict) -> None:
    errs = _parity(qwen_tiny_dir, qwen_loras, [[("a", 0.8)], [("a", 0.5), ("b", 1.0)], [], [("b", -0.6)]],
                   qwen=True)
    print("qwen-image latent rel errors vs diffusers:", errs)
    assert max(errs) <= LATENT_RTOL, errs


def test_kohya_layout_converted_by_diffusers_matches_diffusers(tiny_dir: Path, flux_loras: dict,
                                                               tmp_path: Path) -> None:
    """A kohya ``lora_unet_*`` file (the diffusers adapter ``d`` written in kohya's layout, fused qkv included) is
    converted by ``FluxPipeline.lora_state_dict`` and equals diffusers' ``load_lora_weights(kohya_file)``, alone
    and next to a diffusers-layout adapter in one running set; its layers equal ``d``'s."""
    d = make_lora(tiny_dir, tmp_path / "d.safetensors", seed=7, rank=4, alpha=8, targets=KOHYA_TARGETS)
    kohya = tmp_path / "k.safetensors"
    assert to_kohya_flux(d, kohya) == 16
    assert all(k.startswith("lora_unet_") for k in load_file(kohya))
    assert check_lora_file(kohya, tiny_dir)["layers"] == 16
    errs = _parity(tiny_dir, {"k": kohya, "a": flux_loras["a"], "d": d},
                   [[("k", 0.8)], [("k", 0.5), ("a", 0.7)], [], [("d", 0.8)]], qwen=False)
    print("kohya layout: latent rel errors vs diffusers load_lora_weights(kohya file):", errs)
    assert max(errs) <= LATENT_RTOL, errs
    # the converted adapter is d's on the layers kohya expresses (here: all but the single block's q/k/v)
    from omni_runtime.stages.lora_files import parse_lora, read_lora_file

    got = parse_lora(*read_lora_file(kohya), "k", "FluxPipeline")
    ref = parse_lora(*read_lora_file(d), "d")
    assert set(got) < set(ref) and len(got) == 16
    for mod, (A, B, s) in got.items():
        A0, B0, s0 = ref[mod]
        assert torch.allclose((B @ A) * s, (B0 @ A0) * s0, rtol=1e-5, atol=1e-6), mod


def test_other_layouts_refused_by_name(tiny_dir: Path, flux_loras: dict, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """What diffusers' converter cannot read, DoRA, and another layout with no pipeline class to convert it;
    converted keys outside transformer.* are ignored with a warning, as diffusers' load_lora_weights ignores them."""
    from omni_runtime.stages.lora import LoraBank
    from omni_runtime.stages.lora_files import parse_lora

    g = torch.Generator().manual_seed(0)
    # kohya single-block linear1 assumes Flux-dev's sizes (3072 x 3 + 12288): diffusers' converter refuses it
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(4, 32, generator=g),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(224, 4, generator=g)},
              tmp_path / "linear1.safetensors")
    with pytest.raises(LoraError, match=r"kohya layout .*FluxPipeline.lora_state_dict could not convert"):
        check_lora_file(tmp_path / "linear1.safetensors", tiny_dir)
    # a kohya key diffusers does not know
    save_file({"lora_unet_foo_bar.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_foo_bar.lora_up.weight": torch.zeros(4, 2)}, tmp_path / "unknown.safetensors")
    with pytest.raises(LoraError, match="kohya layout"):
        check_lora_file(tmp_path / "unknown.safetensors", tiny_dir)
    # DoRA in kohya form (diffusers would drop dora_scale silently): refused
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(32, 2),
               "lora_unet_double_blocks_0_img_attn_proj.dora_scale": torch.ones(1, 32)},
              tmp_path / "dora.safetensors")
    with pytest.raises(LoraError, match="DoRA"):
        check_lora_file(tmp_path / "dora.safetensors", tiny_dir)
    # no pipeline class known (a bank built without one): a non-diffusers layout is refused, naming it
    kohya_ok = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, 32),
                "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(32, 2)}
    with pytest.raises(LoraError, match="kohya layout.*no diffusers pipeline class"):
        parse_lora(kohya_ok, {}, "x", None)
    assert set(parse_lora(kohya_ok, {}, "x", "FluxPipeline")) == {"transformer_blocks.0.attn.to_out.0"}
    img_in = {"lora_unet_img_in.lora_down.weight": torch.zeros(2, 64), "lora_unet_img_in.lora_up.weight":
              torch.zeros(32, 2)}  # diffusers converts it to x_embedder.* (no transformer. prefix): not loaded
    with caplog.at_level("WARNING", logger="omni_runtime.stages.lora_files"):
        assert set(parse_lora({**kohya_ok, **img_in}, {}, "x", "FluxPipeline")) == {
            "transformer_blocks.0.attn.to_out.0"}
    assert "2 converted keys outside transformer.* are ignored" in caplog.text
    with pytest.raises(LoraError, match="no transformer LoRA layers"):
        parse_lora(img_in, {}, "x", "FluxPipeline")
    save_file(kohya_ok, tmp_path / "ok.safetensors")
    bank = LoraBank(DenoiserStage.from_pretrained(tiny_dir).model, torch.float32, torch.device("cpu"))
    with pytest.raises(LoraError, match="no diffusers pipeline class"):
        bank.get(LoraSpec("k", str(tmp_path / "ok.safetensors")))
    # un-prefixed keys in diffusers' own naming: nothing to convert, refused as not transformer.* keys
    sd = load_file(flux_loras["b"])
    save_file({k[len("transformer."):]: v for k, v in sd.items()}, tmp_path / "bare.safetensors")
    with pytest.raises(LoraError, match="not a transformer"):
        check_lora_file(tmp_path / "bare.safetensors", tiny_dir)


def test_mixed_sizes_adapter_sets_match_diffusers(tiny_dir: Path, flux_loras: dict) -> None:
    """``mixed_sizes``: requests of different image sizes with different adapters share each step's one padded
    forward; each equals diffusers run alone at its size."""
    forwards: list[int] = []
    sets = [[("a", 1.0)], [("b", 0.7), ("c", -0.5)], [], [("c", 1.3)]]
    errs = _parity(tiny_dir, flux_loras, sets, qwen=False, sizes=[(64, 64), (48, 80), (64, 32), (32, 48)],
                   forwards=forwards, mixed_sizes=True)
    print("mixed sizes: latent rel errors vs diffusers:", errs, "rows per forward:", forwards)
    assert forwards == [5] * STEPS, forwards  # 4 requests + 1 CFG row in one forward per step
    assert max(errs) <= LATENT_RTOL, errs


def _sp_lora_worker(rank: int, world_size: int, model_dir: str, loras: dict, store: str) -> list:
    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec

    mesh = Mesh.build(ParallelSpec(ulysses=2), rank, f"file://{store}", "cpu")
    try:
        stage = DenoiserStage.from_pretrained(model_dir, mesh=mesh)
        seen: list[int] = []
        stage.model.transformer_blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
        reqs = [r for r, _, _ in _requests(stage.config, {k: Path(v) for k, v in loras.items()}, SP_SETS, False)]
        latents = _run_together(stage, reqs)
        return [max(seen)] + [x.flatten().tolist() for x in latents]
    finally:
        mesh.destroy()


SP_SETS = [[("a", 1.0)], [("b", 0.7), ("c", -0.5)], [], [("a", 0.5), ("c", 1.3)]]


@pytest.mark.distributed
@pytest.mark.slow
def test_sequence_parallel_ulysses2_equals_single_process(tiny_dir: Path, flux_loras: dict, tmp_path: Path) -> None:
    """Ulysses 2 on gloo: the rows with their adapters, each rank holding half of the tokens, equal the
    single-process running set (LoRA is per token: nothing to split)."""
    from spawn import run_workers

    single = DenoiserStage.from_pretrained(tiny_dir)
    ref = _run_together(single, [r for r, _, _ in _requests(single.config, flux_loras, SP_SETS, False)])
    plain = single.denoise([_requests(single.config, flux_loras, [[]], False)[0][0]])[0]
    assert ((plain - ref[0]).abs().max() / plain.abs().max()).item() > 1e-3  # the adapter changes the result
    loras = {k: str(v) for k, v in flux_loras.items()}
    results = run_workers(_sp_lora_worker, 2, args=(str(tiny_dir), loras, str(tmp_path / "store")), timeout=120)
    errs = []
    for rank, res in enumerate(results):
        tokens = (H // 16) * (W // 16)
        assert res[0] <= tokens // 2, (rank, res[0], tokens)  # each rank's blocks saw half of the image tokens
        for got, want in zip(res[1:], ref, strict=True):
            want = want.flatten()
            errs.append(((torch.tensor(got) - want).abs().max() / want.abs().max()).item())
    print("ulysses 2 vs single process, latent rel errors (rank 0 then rank 1):", errs)
    assert max(errs) <= 1e-4, errs


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
              tmp_path / "kohya.safetensors")  # lora_down with no lora_up: diffusers' converter fails on it
    with pytest.raises(LoraError, match="kohya layout.*could not convert"):
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
    from omni_runtime.runtime.config import ConfigError
    from omni_runtime.runtime.config_load import config_from_dict

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


def test_config_adapters_preloaded_on_denoiser_ranks(tiny_dir: Path, flux_loras: dict, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """``[lora] adapters`` load on the denoiser rank at start with the keys the registry gives them, so the first
    request naming one reads no file; at most ``max_loaded``; a file that fails is logged, not fatal."""
    from omni_runtime.runtime.config_load import config_from_dict
    from omni_runtime.runtime.lora_registry import LoraRegistry
    from omni_runtime.runtime.requests import parse_request
    from omni_runtime.runtime.stage_worker import stage_options
    from omni_runtime.stages.engine import DenoiserEngine
    from omni_runtime.stages.lora import configured_specs

    adapters = {"c": str(flux_loras["c"]), "a": str(flux_loras["a"])}
    cfg = config_from_dict({"model": {"path": str(tiny_dir)}, "lora": {"adapters": adapters}})
    reg = LoraRegistry(cfg)
    reg.add("early", str(flux_loras["b"]), source="python")  # registered first: the config's keep versions 1, 2
    reg.preload()
    specs = configured_specs(cfg.lora.adapters)
    assert [s.key for s in specs] == [("c", adapters["c"], 1), ("a", adapters["a"], 2)]
    entries = {e.name: (e.name, e.path, e.version) for e in reg.list()}
    assert [entries["c"], entries["a"]] == [s.key for s in specs]
    opts = stage_options("denoiser", lora_max_loaded=8, lora_adapters=cfg.lora.adapters)
    assert opts["lora_preload"] == adapters
    engine = DenoiserEngine.load(tiny_dir, "float32", "cpu", **opts)
    bank = engine.stage.lora
    assert list(bank.cache) == [s.key for s in specs] and bank.loads == 2
    # a request resolved by the registry finds its adapters loaded: no file read on the step loop
    req = reg.resolve(parse_request({"prompt": "x", "lora": [{"name": "a", "scale": 0.5}, {"name": "c"}]}))
    got = bank.acquire([LoraSpec(r.name, r.path, r.version, r.scale) for r in req.lora])
    assert bank.loads == 2 and [ad.name for ad, _ in got] == ["a", "c"]
    # "a" registered again: a version above every one given so far, so the rank reads the new file
    reg.add("a", adapters["a"], source="python")
    again = reg.resolve(parse_request({"prompt": "x", "lora": [{"name": "a"}]})).lora[0]
    assert again.version > 2 and entries["early"][2] != again.version
    bank.get(LoraSpec(again.name, again.path, again.version))
    assert bank.loads == 3
    # the cap: only the first max_loaded are preloaded
    capped = DenoiserEngine.load(tiny_dir, "float32", "cpu", lora_max_loaded=1, lora_preload=adapters).stage.lora
    assert [k[0] for k in capped.cache] == ["c"] and capped.loads == 1
    # a file that cannot be loaded: a warning naming it, the others load, the engine starts
    with caplog.at_level("WARNING", logger="omni_runtime.stages.lora"):
        bad = DenoiserEngine.load(tiny_dir, "float32", "cpu", lora_preload={
            "gone": str(tmp_path / "gone.safetensors"), "a": adapters["a"]}).stage.lora
    assert [k[0] for k in bad.cache] == ["a"] and bad.cache[("a", adapters["a"], 2)].layers
    assert "lora 'gone' not preloaded" in caplog.text and "no such file" in caplog.text
