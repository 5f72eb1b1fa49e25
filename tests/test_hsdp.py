"""HSDP (FSDP2 weight sharding) on real gloo processes.

- ``apply_hsdp_to_model`` on the tiny Flux transformer (loaded weights) and the sharded loader (meta init, each rank
  reads its rows) give the unsharded module's output (rel <= 1e-5, fp32) for shard 2 and shard 2 x replicate 2;
  every rank's local parameter bytes are exactly the ``torch.chunk`` share of each tensor, within one row per
  tensor of 1/shard of the model;
- the 2-rank sharded text encoders (CLIP + T5) give the unsharded encoders' embeddings;
- a model without wrap conditions is one unit and says so in the log;
- a >= 200 MB transformer: each rank's peak RSS during the sharded load stays below 0.6 x the weights (and the
  same measurement sees the full weights for the unsharded load, so it can fail).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from spawn import run_workers
from stage_refs import flux_transformer_inputs, single_rank_config

pytestmark = [pytest.mark.distributed]

REL_TOL = 1e-5


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _expected_local_bytes(model: torch.nn.Module, shard: int, shard_rank: int) -> int:
    """Bytes of this rank's ``torch.chunk`` share of every parameter along dim 0."""
    total = 0
    for p in model.parameters():
        rows = p.shape[0]
        chunk = math.ceil(rows / shard)
        mine = max(0, min(rows, (shard_rank + 1) * chunk) - min(rows, shard_rank * chunk))
        total += mine * (p.numel() // rows) * p.element_size()
    return total


def _flux_worker(rank: int, world_size: int, model_dir: str, replicate: int, how: str) -> dict:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from omni_runtime.parallel.hsdp import (
        HSDPInferenceConfig,
        apply_hsdp_to_model,
        get_fully_shard_world_size,
        local_parameter_bytes,
    )
    from omni_runtime.stages.models.flux.transformer import FluxTransformer

    shard = world_size // replicate
    ref = FluxTransformer.from_pretrained(Path(model_dir) / "transformer")
    inputs = flux_transformer_inputs(ref.config, n_img=24, grid_width=6, timesteps=[0.7, 0.3])
    with torch.no_grad():
        want = ref(**inputs)
    cfg = HSDPInferenceConfig(hsdp_shard_size=shard, hsdp_replicate_size=replicate,
                              forward_prefetch=how == "prefetch")
    if how in ("apply", "prefetch"):  # weights loaded whole, then sharded
        model = apply_hsdp_to_model(FluxTransformer.from_pretrained(Path(model_dir) / "transformer"), cfg)
    else:  # meta init, each rank reads its rows
        model = FluxTransformer.from_pretrained(Path(model_dir) / "transformer", hsdp=cfg)
    with torch.no_grad():
        got = [model(**inputs) for _ in range(2)]  # the second forward runs on re-sharded weights
    placements = set()
    for p in model.parameters():
        assert isinstance(p, DTensor), "a parameter was left unsharded"
        placements.add(tuple(type(pl).__name__ for pl in p.placements))
    expected_placements = {("Shard",)} if replicate == 1 else {("Replicate", "Shard")}
    assert placements == expected_placements, placements
    assert all(isinstance(pl, (Shard, Replicate)) for p in model.parameters() for pl in p.placements)
    shard_rank = rank % shard
    full_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    row_bytes = sum(p.numel() // p.shape[0] * p.element_size() for p in ref.parameters())
    return {"rel": [_rel(g, want) for g in got], "local": local_parameter_bytes(model),
            "expected_local": _expected_local_bytes(ref, shard, shard_rank), "full": full_bytes,
            "row_bytes": row_bytes, "fs_world": get_fully_shard_world_size(model),
            "units": sum(1 for m in model.modules() if type(m).__name__.startswith("FSDP"))}


@pytest.mark.parametrize("world_size,replicate,how", [
    (2, 1, "apply"), (2, 1, "load"), (2, 1, "prefetch"), (4, 2, "apply"), (4, 2, "load")])
def test_flux_hsdp_matches_unsharded(tiny_dir: Path, world_size: int, replicate: int, how: str) -> None:
    results = run_workers(_flux_worker, world_size, args=(str(tiny_dir), replicate, how),
                          init_process_group=True, timeout=240)
    shard = world_size // replicate
    for r, res in enumerate(results):
        assert max(res["rel"]) <= REL_TOL, (r, res["rel"])
        assert res["local"] == res["expected_local"], (r, res)
        # 1/shard of the model, up to one row per tensor of chunk rounding
        assert abs(res["local"] - res["full"] / shard) <= res["row_bytes"], (r, res)
        assert res["fs_world"] == shard
        assert res["units"] == 1 + 1 + 1  # one double block + one single block + the root
    assert sum(res["local"] for res in results) == replicate * results[0]["full"]


def _text_worker(rank: int, world_size: int, model_dir: str) -> dict:
    from omni_runtime.parallel.hsdp import HSDPInferenceConfig, local_parameter_bytes
    from omni_runtime.stages.text_encoder import TextEncoderStage

    prompts = ["a photo of a cat", "the dog on the sofa, at night"]
    ref = TextEncoderStage.from_pretrained(model_dir)
    want = ref.encode(prompts, max_sequence_length=24)
    stage = TextEncoderStage.from_pretrained(model_dir, hsdp=HSDPInferenceConfig(hsdp_shard_size=world_size))
    got = stage.encode(prompts, max_sequence_length=24)
    out = {"rel": {k: _rel(got[k], want[k]) for k in ("prompt_embeds", "pooled_prompt_embeds")}}
    for name in ("text_encoder", "text_encoder_2"):
        full = getattr(ref, name)
        out[name] = {"local": local_parameter_bytes(getattr(stage, name)),
                     "expected": _expected_local_bytes(full, world_size, rank)}
    return out


def test_text_encoders_hsdp_match_unsharded(tiny_dir: Path) -> None:
    results = run_workers(_text_worker, 2, args=(str(tiny_dir),), init_process_group=True, timeout=240)
    for r, res in enumerate(results):
        assert max(res["rel"].values()) <= REL_TOL, (r, res)
        for name in ("text_encoder", "text_encoder_2"):
            assert res[name]["local"] == res[name]["expected"], (r, name, res[name])


class _NoConditions(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 6) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _no_conditions_worker(rank: int, world_size: int) -> dict:
    from omni_runtime.parallel.hsdp import HSDPInferenceConfig, apply_hsdp_to_model, hsdp_units

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(rec.getMessage())  # type: ignore[method-assign]
    logging.getLogger("omni_runtime.parallel.hsdp").addHandler(handler)
    torch.manual_seed(0)
    ref = _NoConditions()
    x = torch.randn(3, 6)
    with torch.no_grad():
        want = ref(x)
        model = _NoConditions()
        model.load_state_dict(ref.state_dict())
        assert hsdp_units(model, []) == []
        apply_hsdp_to_model(model, HSDPInferenceConfig(hsdp_shard_size=world_size))
        got = model(x)
    return {"rel": _rel(got, want), "warned": [m for m in records if "no _hsdp_shard_conditions" in m]}


def test_model_without_wrap_conditions_is_one_unit_with_a_warning() -> None:
    for res in run_workers(_no_conditions_worker, 2, init_process_group=True, timeout=120):
        assert res["rel"] <= REL_TOL
        assert len(res["warned"]) == 1, res


def test_the_hsdp_world_size_rule_is_one_function_with_one_message() -> None:
    """The config, ParallelSpec and parallel.hsdp all refuse a wrong HSDP product with the same words."""
    from omni_runtime.parallel.hsdp import HSDPConfigError, HSDPInferenceConfig
    from omni_runtime.parallel.parallel_spec import ParallelSpec, ParallelSpecError, hsdp_world_error
    from omni_runtime.runtime.config import ConfigError
    from omni_runtime.runtime.config_load import config_from_dict

    rule = "hsdp_shard 4 × hsdp_replicate 1 = 4 does not equal the world size"
    assert hsdp_world_error(4, 1, 4) is None and hsdp_world_error(1, 1, 8) is None
    assert hsdp_world_error(4, 1, 2) == f"{rule} 2 (set both to 1 to disable HSDP)"
    with pytest.raises(ConfigError) as c:
        config_from_dict({"model": {"path": "/m"}, "stages": {"denoiser": {"parallel": {"ulysses": 2,
                                                                                          "hsdp_shard": 4}}}})
    with pytest.raises(ParallelSpecError) as p:
        ParallelSpec(ulysses=2, hsdp_shard=4)
    with pytest.raises(HSDPConfigError) as h:
        HSDPInferenceConfig(hsdp_shard_size=4).check_world_size(2)
    for e in (c, p, h):
        assert rule in str(e.value) and str(e.value).endswith(" 2 (set both to 1 to disable HSDP)"), e.value


def test_config_errors_show_the_arithmetic() -> None:
    from omni_runtime.parallel.hsdp import HSDPConfigError, HSDPInferenceConfig

    with pytest.raises(HSDPConfigError, match=r"hsdp_shard 3 × hsdp_replicate 2 = 6 does not equal the world size 4"):
        HSDPInferenceConfig(hsdp_shard_size=3, hsdp_replicate_size=2).check_world_size(4)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(HSDPConfigError, match=r"hsdp_shard_size = .*: must be an integer >= 1"):
            HSDPInferenceConfig(hsdp_shard_size=bad)  # type: ignore[arg-type]
    assert HSDPInferenceConfig(hsdp_shard_size=2, hsdp_replicate_size=2).world_size == 4


# ------------------------------------------------------------------------------------------- the mesh


def test_parallel_spec_hsdp_alone_is_the_world_and_prints_its_arithmetic() -> None:
    """HSDP with no model degree: the world is hsdp_shard x hsdp_replicate ranks that all run the batch (the same
    rule as a VAE stage's patch ranks), shard groups contiguous, replicate groups strided."""
    from omni_runtime.parallel.parallel_spec import ParallelSpec, ParallelSpecError

    spec = ParallelSpec(hsdp_shard=2, hsdp_replicate=2)
    assert spec.world_size == 4 and spec.model_size == 1
    groups = spec.group_ranks()
    assert groups["hsdp_shard"] == [[0, 1], [2, 3]] and groups["hsdp_replicate"] == [[0, 2], [1, 3]]
    assert groups["world"] == [[0, 1, 2, 3]]
    assert all(groups[n] == [[r] for r in range(4)] for n in ("sp", "cfg", "pp", "dp", "ep", "vae_patch"))
    assert ParallelSpec(hsdp_shard=3).world_size == 3
    assert ParallelSpec(ulysses=2, hsdp_shard=2).world_size == 2  # weights sharded over the SP ranks
    with pytest.raises(ParallelSpecError, match=r"hsdp_shard 4 × hsdp_replicate 1 = 4 does not equal the world "
                                                r"size tp 1 × ulysses 2 × ring 1 × pp 1 × cfg 1 × dp 1 = 2"):
        ParallelSpec(ulysses=2, hsdp_shard=4)
    with pytest.raises(ParallelSpecError, match=r"hsdp_shard 2 × hsdp_replicate 1 = 2 does not equal the world "
                                                r"size max\(vae_patch 4, hsdp_shard 2 × hsdp_replicate 1\)"):
        ParallelSpec(vae_patch=4, hsdp_shard=2)


def _printed(out: str, stage: str) -> dict[int, dict[str, list[int]]]:
    import re

    got = {}
    for m in re.finditer(rf"^  {stage}\[0\] rank (\d+)/\d+ on \S+: (.*)$", out, re.M):
        got[int(m.group(1))] = {k: [int(x) for x in v.split(", ")]
                                for k, v in re.findall(r"(\w+)=\[([\d, ]+)\]", m.group(2))}
    return got


def test_check_prints_the_hsdp_groups_of_both_stages(capsys) -> None:
    from omni_runtime.runtime.cli import main

    configs = Path(__file__).resolve().parent.parent / "configs"
    assert main(["check", str(configs / "hsdp2.toml")]) == 0
    out = capsys.readouterr().out
    for stage in ("text_encoder", "denoiser"):
        assert _printed(out, stage) == {r: {"world": [0, 1], "hsdp_shard": [0, 1]} for r in (0, 1)}, out
    assert main(["check", str(configs / "hsdp2x2.toml")]) == 0
    printed = _printed(capsys.readouterr().out, "denoiser")
    assert printed[3] == {"world": [0, 1, 2, 3], "hsdp_shard": [2, 3], "hsdp_replicate": [1, 3]}


class _Blocks(torch.nn.Module):
    _hsdp_shard_conditions = [lambda name, m: name.startswith("blocks.") and name.count(".") == 1]

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


def _mesh_worker(rank: int, world_size: int, stage: str, parallel: dict) -> dict:
    """What a served rank does: its Mesh from the WorkerSpec (stage_worker._init_distributed), then the HSDP config
    from the mesh's groups (the one served wiring), then a sharded forward against the unsharded module."""
    import os

    from omni_runtime.parallel.hsdp import apply_hsdp_to_model, hsdp_config_from_mesh, local_parameter_bytes
    from omni_runtime.runtime.stage_worker import WorkerSpec, _init_distributed

    spec = WorkerSpec(stage=stage, replica=0, rank=rank, world_size=world_size,
                      master_port=int(os.environ["MASTER_PORT"]), model_path="unused", dtype="float32",
                      device="cpu", in_addr="ipc://unused", out_addr="ipc://unused", max_batch_size=1,
                      batch_timeout_ms=0.0, instance="test", parent_pid=os.getpid(), parallel=parallel)
    mesh = _init_distributed(spec)
    try:
        cfg = hsdp_config_from_mesh(mesh)
        torch.manual_seed(0)
        ref = _Blocks()
        model = _Blocks()
        model.load_state_dict(ref.state_dict())
        x = torch.randn(4, 8)
        with torch.no_grad():
            want = ref(x)
            got = apply_hsdp_to_model(model, cfg)(x)
        dm = cfg.device_mesh
        return {"groups": {n: mesh.groups_report()[n] for n in ("hsdp_shard", "hsdp_replicate")},
                "device_mesh": dm.mesh.tolist(), "dims": list(dm.mesh_dim_names), "rel": _rel(got, want),
                "local": local_parameter_bytes(model), "full": sum(p.numel() * 4 for p in ref.parameters())}
    finally:
        mesh.destroy()


@pytest.mark.parametrize("stage, parallel, world, device_mesh, dims", [
    ("denoiser", {"hsdp_shard": 2, "hsdp_replicate": 2}, 4, [[0, 1], [2, 3]], ["replicate", "shard"]),
    ("denoiser", {"ulysses": 2, "hsdp_shard": 2}, 2, [0, 1], ["shard"]),
    ("text_encoder", {"hsdp_shard": 2}, 2, [0, 1], ["shard"]),
])
def test_hsdp_config_from_the_workers_mesh(stage: str, parallel: dict, world: int, device_mesh: list,
                                           dims: list) -> None:
    from omni_runtime.parallel.parallel_spec import ParallelSpec

    spec = ParallelSpec(**parallel)
    results = run_workers(_mesh_worker, world, args=(stage, parallel), timeout=120)
    for r, res in enumerate(results):
        assert res["groups"] == {n: spec.groups_of(r)[n] for n in ("hsdp_shard", "hsdp_replicate")}, r
        assert res["device_mesh"] == device_mesh and res["dims"] == dims, (r, res)
        assert res["rel"] <= REL_TOL, (r, res)
        assert res["local"] == res["full"] // 2, (r, res)  # 8-row tensors: exactly half each


def test_hsdp_config_from_a_mesh_without_sharding_is_none() -> None:
    from omni_runtime.parallel.hsdp import hsdp_config_from_mesh
    from omni_runtime.parallel.mesh import Mesh

    assert hsdp_config_from_mesh(Mesh.single()) is None


# ------------------------------------------------------------------------------------------- load memory

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_rss_during(fn) -> tuple[int, int, object]:
    """(RSS before, peak RSS during ``fn()``, its result): the kernel's high-water mark is reset first."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kb("VmRSS")
    result = fn()
    return before, _status_kb("VmHWM"), result


def _touched(model: torch.nn.Module) -> torch.nn.Module:
    """Read every byte of this rank's parameters: the unsharded loader's tensors are views of the memory-mapped
    file, whose pages only become resident when read (as a forward would)."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        (p.to_local() if isinstance(p, DTensor) else p).sum()
    return model


def _memory_worker(rank: int, world_size: int, path: str) -> dict:
    from omni_runtime.parallel.hsdp import HSDPInferenceConfig, apply_hsdp_to_model, local_parameter_bytes
    from omni_runtime.stages.models.flux.transformer import FluxTransformer

    # The process baseline includes the distributed setup: the device mesh, its gloo groups and what the first
    # fully_shard call imports (~40 MB here, whatever the model size); a tiny model pays it before measuring.
    cfg = HSDPInferenceConfig(hsdp_shard_size=world_size)
    apply_hsdp_to_model(torch.nn.Linear(4, 4, device="meta"), cfg)
    before, peak, model = peak_rss_during(lambda: _touched(FluxTransformer.from_pretrained(path, hsdp=cfg)))
    return {"before": before, "peak": peak, "local": local_parameter_bytes(model)}


def _unsharded_memory_worker(rank: int, world_size: int, path: str) -> dict:
    from omni_runtime.stages.models.flux.transformer import FluxTransformer

    before, peak, _ = peak_rss_during(lambda: _touched(FluxTransformer.from_pretrained(path)))
    return {"before": before, "peak": peak}


@pytest.mark.slow
def test_sharded_load_peak_memory(tmp_path: Path) -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    from omni_runtime.stages.models.flux.tiny import make_big_transformer

    weights = make_big_transformer(tmp_path / "transformer")
    assert weights >= 200e6
    results = run_workers(_memory_worker, 2, args=(str(tmp_path / "transformer"),), init_process_group=True,
                          timeout=400)
    for r, res in enumerate(results):
        grew = res["peak"] - res["before"]
        assert grew < 0.6 * weights, (r, grew / weights, res)
        assert abs(res["local"] - weights / 2) < 0.01 * weights, (r, res)
    # the control, in a fresh process: the same measurement around the unsharded load sees all the weights
    full = run_workers(_unsharded_memory_worker, 1, args=(str(tmp_path / "transformer"),), timeout=200)[0]
    full_grew = full["peak"] - full["before"]
    assert full_grew > 0.9 * weights, ("the RSS measurement does not see an unsharded load", full_grew / weights)


# ------------------------------------------------------------------------------------------- served


SERVED = {
    # config: (stage titles, log lines that prove the sharding happened, each on every rank of its stage)
    "hsdp2.toml": (["denoiser[0] rank 0/2", "denoiser[0] rank 1/2", "text_encoder[0] rank 0/2",
                    "text_encoder[0] rank 1/2", "vae[0] rank 0/1"],
                   {"sharded over 2 ranks": 2, "HSDP: FluxTransformer sharded": 2,
                    "HSDP: T5EncoderModel sharded": 2, "HSDP: CLIPTextModel sharded": 2}),
    "hsdp2x2.toml": ([f"denoiser[0] rank {r}/4" for r in range(4)] + ["text_encoder[0] rank 0/1", "vae[0] rank 0/1"],
                     {"sharded over 2 ranks": 4, "HSDP: FluxTransformer sharded over [[0, 1], [2, 3]]": 4}),
    "sp2_hsdp2.toml": (["denoiser[0] rank 0/2", "denoiser[0] rank 1/2", "text_encoder[0] rank 0/1",
                        "vae[0] rank 0/1"],
                       {"sharded over 2 ranks": 2, "HSDP: FluxTransformer sharded": 2,
                        "sequence parallel over 2 ranks": 2}),
}


def _serve_hsdp(tmp: Path, config: str):
    """A server of ``config`` with mixed sizes on where the layout takes them (no Ulysses)."""
    from test_server_harness import ROOT, Server

    mixed = "ulysses = 2" not in (ROOT / "configs" / config).read_text()
    return Server(tmp, base_config=config,
                  edits={"[stages.denoiser]\n": "[stages.denoiser]\nmixed_sizes = true\n"} if mixed else None), mixed


@pytest.fixture(scope="module")
def hsdp2_server(tmp_path_factory: pytest.TempPathFactory):
    """One hsdp2.toml server for the comparison with the single-process pipeline and then the SIGKILL test (in this
    order: the comparison counts the log lines of the first generation of ranks)."""
    server, _ = _serve_hsdp(tmp_path_factory.mktemp("hsdp2"), "hsdp2.toml")
    yield server
    server.stop()
    assert server.shm_entries() == []


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("config", sorted(SERVED))
def test_served_hsdp_matches_the_default_pipeline(tmp_path: Path, config: str, request: pytest.FixtureRequest) -> None:
    """``serve`` with HSDP, two requests in one step-level running set: each image equals the single-process
    pipeline's (max |delta| <= 1/255). hsdp2.toml: the denoiser and the text encoders each sharded over 2 ranks;
    hsdp2x2.toml: 4 denoiser ranks, shard 2 x replicate 2; sp2_hsdp2.toml: Ulysses 2 and hsdp_shard 2 on the same 2 denoiser ranks."""
    import numpy as np
    from test_server_harness import images_together

    from omni_runtime.runtime import Omni

    titles, proofs = SERVED[config]
    # both requests join a long request's step-level running set; without Ulysses the denoiser also runs mixed
    # sizes (USAGE: mixed sizes work with HSDP), so the 64x48 one shares the 64x64 ones' forwards
    shared = config == "hsdp2.toml"  # the server the SIGKILL test then uses
    server, mixed = (request.getfixturevalue("hsdp2_server"), True) if shared else _serve_hsdp(tmp_path, config)
    carrier = {"prompt": "a long walk", "seed": 1, "size": "64x64", "num_inference_steps": 200}
    requests = [("a castle on a hill", {"seed": 21, "size": "64x64", "num_inference_steps": 3}),
                ("a red cube", {"seed": 5, "size": "64x48" if mixed else "64x64", "num_inference_steps": 2,
                                "negative_prompt": "blurry", "true_cfg_scale": 4.0})]
    try:
        assert sorted(" ".join(p.cmdline()).strip() for p in server.stage_procs()) == [
            f"omni-runtime: {t}" for t in titles]
        # the second joins the first's running set (of another size where mixed) under HSDP
        bodies = [{"prompt": prompt, **body} for prompt, body in requests]
        served = images_together(server, carrier, bodies)
        log = server.log_text()
        assert "(generation 2)" not in log, "the SIGKILL test ran first on the shared hsdp2 server"
        for line, count in proofs.items():
            assert log.count(line) == count, (line, log[-3000:])
    finally:
        if not shared:
            server.stop()
            assert server.shm_entries() == []
    with Omni(single_rank_config(server.config_path), in_process=True) as omni:
        refs = [np.asarray(omni.generate(prompt, **body)[0]) for prompt, body in requests]
    for got, ref in zip(served, refs, strict=True):
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert got.shape == ref.shape and diff.max() <= 1, (diff.max(), (diff > 0).mean())


# ------------------------------------------------------------------------------------------- config


def _config(stages: dict) -> object:
    from omni_runtime.runtime.config_load import config_from_dict

    return config_from_dict({"model": {"path": "/nonexistent/model"}, "stages": stages})


@pytest.mark.parametrize("stages, world", [
    ({"denoiser": {"parallel": {"hsdp_shard": 2}}}, {"denoiser": 2, "text_encoder": 1}),
    ({"denoiser": {"parallel": {"hsdp_shard": 2, "hsdp_replicate": 2}}}, {"denoiser": 4, "text_encoder": 1}),
    ({"denoiser": {"parallel": {"ulysses": 2, "hsdp_shard": 2}}}, {"denoiser": 2, "text_encoder": 1}),
    ({"text_encoder": {"parallel": {"hsdp_shard": 2}}}, {"denoiser": 1, "text_encoder": 2}),
    ({"text_encoder": {"parallel": {"hsdp_shard": 2, "hsdp_replicate": 3}}}, {"denoiser": 1, "text_encoder": 6}),
])
def test_config_accepts_hsdp_and_sizes_the_replica(stages: dict, world: dict) -> None:
    cfg = _config(stages)
    assert {name: cfg.stages.get(name).world_size for name in world} == world  # type: ignore[attr-defined]


@pytest.mark.parametrize("stages, message", [
    ({"denoiser": {"parallel": {"ulysses": 2, "hsdp_shard": 4}}},
     r"stages.denoiser.parallel.hsdp_shard = 4 with hsdp_replicate = 1: hsdp_shard 4 × hsdp_replicate 1 = 4 does "
     r"not equal the world size tp 1 × ulysses 2 × ring 1 × pp 1 × cfg 1 × dp 1 = 2 \(set both to 1 to disable "
     r"HSDP\)"),
    ({"denoiser": {"parallel": {"ulysses": 2, "hsdp_shard": 2, "hsdp_replicate": 2}}},
     r"hsdp_shard 2 × hsdp_replicate 2 = 4 does not equal the world size .* = 2"),
    ({"text_encoder": {"parallel": {"hsdp_shard": 0}}}, r"stages.text_encoder.parallel.hsdp_shard = 0: must be .*>= 1"),
    ({"text_encoder": {"parallel": {"hsdp_replicate": -2}}},
     r"stages.text_encoder.parallel.hsdp_replicate = -2: must be .*>= 1"),
    ({"text_encoder": {"parallel": {"hsdp_shard": "2"}}},
     r"stages.text_encoder.parallel.hsdp_shard = '2' \(str\): must be an integer"),
    ({"text_encoder": {"parallel": {"ulysses": 2}}},
     r"stages.text_encoder.parallel.ulysses: unknown key .*allowed keys here: hsdp_replicate, hsdp_shard"),
    ({"text_encoder": {"parallel": 2}}, r"stages.text_encoder.parallel = 2 \(int\): must be a table"),
])
def test_config_rejects_bad_hsdp_values_naming_the_key(stages: dict, message: str) -> None:
    from omni_runtime.runtime.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _config(stages)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_of_a_sharded_denoiser_rank_gives_503_then_recovers(hsdp2_server) -> None:
    """A sharded follower rank dies mid-request (its peer waits in an all-gather of the weights): the request
    fails fast with a 503 naming the denoiser, the replica restarts, and the next request succeeds."""

    import numpy as np
    from test_server_harness import image_of, post_and_kill

    server = hsdp2_server
    victim = [p for p in server.stage_procs() if "denoiser[0] rank 1/2" in " ".join(p.cmdline())]
    assert len(victim) == 1
    after_body = {"prompt": "after the crash", "seed": 1, "size": "64x64", "num_inference_steps": 2}
    before = image_of(server, after_body)
    r, after_kill = post_and_kill(server, victim[0], {"prompt": "slow", "seed": 3, "size": "512x512",
                                                      "num_inference_steps": 200})
    assert r.status_code == 503 and "denoiser" in r.json()["error"]["message"], r.text
    assert "rank 1 died" in r.json()["error"]["message"], r.text  # from the death, not the stall watch
    assert np.array_equal(image_of(server, after_body), before)  # the restarted replica: the same image
    assert "denoiser[0] ready (generation 2)" in server.log_text()


# ------------------------------------------------------------------------------------------- checkpoint errors


class _Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 5)
        self.b = torch.nn.Linear(5, 2)


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def _meta_two() -> torch.nn.Module:
    from omni_runtime.stages.sharded_load import init_params_on_meta

    with init_params_on_meta():
        return _Two()


def test_sharded_reader_reads_rows_and_casts_like_the_unsharded_loader(tmp_path: Path) -> None:
    from omni_runtime.stages.sharded_load import load_sharded_weights

    torch.manual_seed(0)
    ref = _Two()
    comp = _write(tmp_path / "c", {k: v.double() for k, v in ref.state_dict().items()})  # F64 file, fp32 model
    model = _meta_two()
    assert all(p.device.type == "meta" for p in model.parameters())
    stats = load_sharded_weights(model, comp, "model", device=torch.device("cpu"))
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.double().float()), k
    assert stats.tensors == 4 and stats.bytes_read == sum(v.numel() * 8 for v in ref.state_dict().values())


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], r"header length 1000000000 does not fit a file of"),
    (lambda raw: raw[:8] + b"{" * (int.from_bytes(raw[:8], "little")) + raw[8 + int.from_bytes(raw[:8], "little"):],
     r"the safetensors header is not valid JSON"),
    (lambda raw: raw[:-8], r"claims bytes \[\d+, \d+\) but needs \d+ inside the file's \d+ data bytes"),
    (lambda raw: raw.replace(b'"F32"', b'"X32"', 1), r"malformed header entry .*dtype one of"),
    (lambda raw: raw[:5], r"shorter than its 8-byte header length"),
])
def test_sharded_reader_rejects_a_damaged_file_naming_it(tmp_path: Path, mutate, message: str) -> None:
    from omni_runtime.stages.errors import CheckpointError
    from omni_runtime.stages.sharded_load import load_sharded_weights

    comp = _write(tmp_path / "c", _Two().state_dict())
    f = comp / "model.safetensors"
    f.write_bytes(mutate(f.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as e:
        load_sharded_weights(_meta_two(), comp, "model", device=torch.device("cpu"))
    assert str(f) in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: {k: v for k, v in sd.items() if k != "b.bias"}, r"missing keys \(1\): b.bias"),
    (lambda sd: {**sd, "c.weight": torch.zeros(1)}, r"unexpected keys \(1\): c.weight"),
    (lambda sd: {**sd, "a.weight": torch.zeros(4, 3)}, r"shape mismatches \(1\): a.weight: checkpoint \(4, 3\) vs "
                                                       r"model \(5, 3\)"),
])
def test_sharded_reader_rejects_a_checkpoint_that_does_not_fit(tmp_path: Path, edit, message: str) -> None:
    from omni_runtime.stages.errors import CheckpointError
    from omni_runtime.stages.sharded_load import load_sharded_weights

    comp = _write(tmp_path / "c", edit(_Two().state_dict()))
    with pytest.raises(CheckpointError, match=message):
        load_sharded_weights(_meta_two(), comp, "model", device=torch.device("cpu"))
