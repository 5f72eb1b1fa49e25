"""MoEFeedForward under expert parallelism (gloo worlds of 2 and 4) and the MoE variant of the tiny Flux model.

References: the same layer / model in one process with every expert (fp32, rel <= 1e-5). Parameter counts
prove each EP rank holds, and loads, only its own experts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from make_tiny_model import main as make_tiny_main
from spawn import run_workers

from omni_runtime.parallel.all2all import CPU_CAPABLE_BACKENDS, All2AllError, attach_all2all_manager
from omni_runtime.parallel.moe import MoEFeedForward, is_local_expert_key
from omni_runtime.stages.errors import CheckpointError

DIM, EXPERTS, TOP_K, HIDDEN = 16, 8, 2, 24
COUNTS = [6, 0, 9, 4]


def _full_layer() -> MoEFeedForward:
    torch.manual_seed(3)
    return MoEFeedForward(DIM, EXPERTS, TOP_K, HIDDEN, shared_expert=True)


def _x(rank: int) -> torch.Tensor:
    return torch.randn(1, COUNTS[rank], DIM, generator=torch.Generator().manual_seed(50 + rank))


def _expert_params(layer: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in layer.named_parameters() if ".experts." in f".{n}")


def _layer_worker(rank: int, world: int, backend: str) -> dict:
    from omni_runtime.parallel.group_coordinator import GroupCoordinator

    group = GroupCoordinator([list(range(world))], rank, "gloo", group_name="ep")
    try:
        layer = MoEFeedForward(DIM, EXPERTS, TOP_K, HIDDEN, shared_expert=True, ep_group=group,
                               is_sequence_parallel=True)
        full = _full_layer()
        layer.load_state_dict({k: v for k, v in full.state_dict().items() if k in layer.state_dict()}, strict=True)
        attach_all2all_manager(group, backend)
        group.device_communicator.prepare_communication_buffer_for_model(layer)
        out = layer(_x(rank))
        ref = full(_x(rank))
        rel = float((out - ref).abs().max() / ref.abs().max()) if ref.numel() else 0.0
        return {"rel": rel, "shape": list(out.shape), "experts": sorted(int(k) for k in layer.experts),
                "expert_params": _expert_params(layer), "full_expert_params": _expert_params(full),
                "num_experts_seen": group.device_communicator.all2all_manager.num_experts}
    finally:
        group.destroy()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", CPU_CAPABLE_BACKENDS)
def test_moe_layer_expert_parallel_matches_single_process(world: int, backend: str) -> None:
    results = run_workers(_layer_worker, world, args=(backend,), init_process_group=True, timeout=60)
    per = EXPERTS // world
    for rank, res in enumerate(results):
        assert res["rel"] <= 1e-5, (rank, res["rel"])
        assert res["shape"] == [1, COUNTS[rank], DIM]
        assert res["experts"] == list(range(rank * per, (rank + 1) * per))
        assert res["expert_params"] * world == res["full_expert_params"]
        assert res["num_experts_seen"] == EXPERTS  # prepare_communication_buffer_for_model read the layer


def test_moe_layer_bad_arguments() -> None:
    with pytest.raises(All2AllError, match="moe top_k = 9: must be between 1 and num_experts = 8"):
        MoEFeedForward(DIM, 8, 9, HIDDEN)
    assert is_local_expert_key("a.ff.experts.5.w1.weight", 8, 2, 1)
    assert not is_local_expert_key("a.ff.experts.3.w1.weight", 8, 2, 1)
    assert is_local_expert_key("a.ff.gate.weight", 8, 2, 1) and is_local_expert_key("a.ff.shared_experts.w1", 8, 2, 1)


# ---------------------------------------------------------------------------------------------- tiny MoE model

@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "model"
    assert make_tiny_main([str(out), "--moe-experts", "4", "--moe-top-k", "2"]) == 0
    return out


def _inputs(cfg: dict) -> dict:
    g = torch.Generator().manual_seed(7)
    n_img, n_txt = 16, 5
    return dict(hidden_states=torch.randn(1, n_img, cfg["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(1, n_txt, cfg["joint_attention_dim"], generator=g),
                pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
                timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
                img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                                   indexing="ij"), -1).reshape(-1, 3),
                txt_ids=torch.zeros(n_txt, 3))


def _model_worker(rank: int, world: int, path: str, backend: str) -> dict:
    from omni_runtime.parallel.group_coordinator import GroupCoordinator
    from omni_runtime.stages.models.flux.transformer import FluxTransformer

    group = GroupCoordinator([list(range(world))], rank, "gloo", group_name="ep")
    try:
        attach_all2all_manager(group, backend)
        model = FluxTransformer.from_pretrained(path, ep_group=group)
        group.device_communicator.prepare_communication_buffer_for_model(model)
        cfg = json.loads((Path(path) / "transformer" / "config.json").read_text())
        with torch.no_grad():
            out = model(**_inputs(cfg))
        experts = sorted({n.split(".experts.")[1].split(".")[0] for n, _ in model.named_parameters()
                          if ".experts." in n})
        return {"out": out.flatten().tolist(), "experts": experts, "expert_params": _expert_params(model),
                "params": sum(p.numel() for p in model.parameters())}
    finally:
        group.destroy()


@pytest.mark.distributed
@pytest.mark.parametrize("backend", CPU_CAPABLE_BACKENDS)
def test_tiny_moe_model_expert_parallel_matches_one_rank(moe_dir: Path, backend: str) -> None:
    from omni_runtime.stages.models.flux.transformer import FluxTransformer

    full = FluxTransformer.from_pretrained(moe_dir)
    cfg = json.loads((moe_dir / "transformer" / "config.json").read_text())
    assert cfg["moe_num_experts"] == 4 and cfg["moe_top_k"] == 2
    with torch.no_grad():
        ref = full(**_inputs(cfg)).flatten()
    results = run_workers(_model_worker, 2, args=(str(moe_dir), backend), init_process_group=True, timeout=120)
    full_experts = _expert_params(full)
    assert full_experts > 0
    for rank, res in enumerate(results):
        out = torch.tensor(res["out"])
        assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5, rank
        assert res["experts"] == [str(2 * rank), str(2 * rank + 1)]
        assert res["expert_params"] * 2 == full_experts
        assert res["params"] == sum(p.numel() for p in full.parameters()) - full_experts // 2


def test_tiny_moe_model_layout(moe_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(moe_dir / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "single_transformer_blocks.0.ff.experts.3.w2.weight" in keys
    assert "single_transformer_blocks.0.ff.shared_experts.w1.weight" in keys
    assert "single_transformer_blocks.0.ff.gate.weight" in keys
    assert not any("proj_mlp" in k for k in keys)
    assert not any(".ff.experts." in k for k in keys if k.startswith("transformer_blocks."))  # double blocks: dense


@pytest.mark.parametrize("argv,message", [
    (["--moe-experts", "-1"], "--moe-experts -1: must be an integer >= 0"),
    (["--moe-experts", "4", "--moe-top-k", "5"], "--moe-top-k 5: must be an integer from 1 to --moe-experts 4"),
    (["--moe-experts", "4", "--moe-top-k", "0"], "--moe-top-k 0: must be an integer from 1"),
])
def test_make_tiny_model_rejects_bad_moe_flags(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        make_tiny_main([str(tmp_path / "m"), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("field,value,message", [
    ("moe_top_k", 0, "moe_top_k=0; expected 1 <= moe_top_k <= moe_num_experts=4"),
    ("moe_top_k", 5, "moe_top_k=5; expected 1 <= moe_top_k <= moe_num_experts=4"),
    ("moe_hidden_dim", -2, "moe_hidden_dim=-2; expected a non-negative integer"),
])
def test_flux_config_rejects_bad_moe_keys(field: str, value: int, message: str) -> None:
    from omni_runtime.stages.models.flux.transformer import FluxConfig

    cfg = {"num_attention_heads": 2, "attention_head_dim": 16, "axes_dims_rope": [4, 6, 6], "moe_num_experts": 4,
           field: value}
    with pytest.raises(CheckpointError, match=message):
        FluxConfig.from_dict(cfg)
