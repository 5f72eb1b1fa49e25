"""Layer pipeline parallelism (``parallel/strategies/pipeline_parallel.py``) on real gloo processes.

- The DenoiserStage on pp = 2 (and pp = 2 x ulysses = 2) gives the latents of the single-process run (rel <= 1e-5)
  for requests with and without true CFG, one micro-batch per row and fewer micro-batches than rows; every rank
  ends with identical latents.
- Each pp rank holds exactly its share of the parameters, to the parameter, and its tensors equal the checkpoint's.
- The split rule, the micro-batch split, the config keys and the error for more stages than blocks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spawn import run_workers  # noqa: E402

from omni_runtime.parallel.parallel_spec import ParallelSpec, ParallelSpecError
from omni_runtime.parallel.strategies.pipeline_parallel import (
    PipelineError,
    block_ranges,
    split_rows,
)

# (prompt, negative prompt or None, seed, height, width, true_cfg_scale)
CASES = [
    ("a photo of a cat", None, 1, 208, 144, 1.0),
    ("the dog on the sofa", None, 2, 208, 144, 1.0),
    ("a lighthouse", None, 3, 208, 144, 1.0),
    ("a red cube", "blurry", 4, 272, 208, 4.0),
    ("a blue cube", "dark", 5, 272, 208, 4.0),
]
STEPS = 2
MAX_SEQ = 16


def _requests(model_dir: str) -> list:
    from stage_refs import encoded_requests

    from omni_runtime.stages import TextEncoderStage

    return encoded_requests(TextEncoderStage.from_pretrained(model_dir, "float32", "cpu"), CASES, STEPS, MAX_SEQ)


def _run(model_dir: str, mesh=None) -> dict:
    from omni_runtime.stages import DenoiserStage

    den = DenoiserStage.from_pretrained(model_dir, "float32", "cpu", mesh=mesh)
    latents = den.denoise(_requests(model_dir))
    params = {n: p.detach().clone() for n, p in den.model.named_parameters()}
    return {"latents": [x.flatten().tolist() for x in latents],
            "param_count": sum(p.numel() for p in params.values()),
            "param_names": sorted(params),
            "param_sums": {n: float(p.double().sum()) for n, p in params.items()},
            "stage": list(getattr(den.model, "pp_stage", ())),
            "mb": getattr(den.forward_rows, "stats", None) and den.forward_rows.stats.microbatches}


def _pp_worker(rank: int, world_size: int, model_dir: str, out_dir: str, pp: int, ulysses: int,
               microbatches: int) -> dict:
    import os

    from omni_runtime.parallel.mesh import Mesh

    store = Path(out_dir) / f"store-pp{pp}-u{ulysses}-{os.environ['MASTER_PORT']}"
    mesh = Mesh.build(ParallelSpec(pp=pp, ulysses=ulysses, pp_microbatches=microbatches), rank, f"file://{store}",
                      "cpu")
    try:
        return _run(model_dir, mesh)
    finally:
        mesh.destroy()


@pytest.fixture(scope="module")
def single(tiny_dir: Path) -> dict:
    return _run(str(tiny_dir))


def _check_latents(results: list[dict], ref: dict) -> None:
    for rank, res in enumerate(results):
        assert res["latents"] == results[0]["latents"], f"rank {rank} latents differ from rank 0"
    for i, case in enumerate(CASES):
        got, want = torch.tensor(results[0]["latents"][i]), torch.tensor(ref["latents"][i])
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel <= 1e-5, f"case {case}: latent relative error {rel:.3g}"


def _check_params(results: list[dict], ref: dict, pp: int, ulysses: int) -> None:
    """Each pp rank holds exactly the embedders (first), its blocks (get_pp_indices over 1 double + 1 single
    block of the tiny model) and the head (last), with the checkpoint's values."""
    def owner(name: str) -> int:
        if name.startswith(("time_text_embed.", "context_embedder.", "x_embedder.")):
            return 0
        if name.startswith(("norm_out.", "proj_out.")):
            return pp - 1
        block = int(name.split(".")[1]) + (1 if name.startswith("single_transformer_blocks.") else 0)
        return next(r for r, (a, b) in enumerate(block_ranges(2, pp)) if a <= block < b)

    full_names = ref["param_names"]
    for rank, res in enumerate(results):
        pp_rank = rank // ulysses  # rank order tp-sp-pp: the ulysses ranks of one stage are contiguous
        share = [n for n in full_names if owner(n) == pp_rank]
        assert res["param_names"] == share, f"rank {rank} holds {res['param_names']}, its share is {share}"
        assert res["param_count"] == sum(numel for n, numel in ref["numels"].items() if owner(n) == pp_rank)
        for n in share:
            assert res["param_sums"][n] == ref["param_sums"][n], f"rank {rank}: {n} differs from the checkpoint"
        assert res["stage"][:2] == [pp_rank, pp]
    assert sum(r["param_count"] for r in results[::ulysses]) == ref["param_count"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("pp", "ulysses", "microbatches"), [(2, 1, 0), (2, 1, 2), (2, 2, 0)],
                         ids=["pp2", "pp2-mb2", "pp2xulysses2"])
def test_layer_pp_equals_single_process(tiny_dir: Path, single: dict, tmp_path: Path, pp: int, ulysses: int,
                                        microbatches: int) -> None:
    from omni_runtime.stages.models.flux.transformer import FluxTransformer

    full = FluxTransformer.from_pretrained(tiny_dir / "transformer")
    ref = {**single, "numels": {n: p.numel() for n, p in full.named_parameters()}}
    results = run_workers(_pp_worker, pp * ulysses, args=(str(tiny_dir), str(tmp_path), pp, ulysses, microbatches),
                          timeout=300)
    _check_latents(results, ref)
    _check_params(results, ref, pp, ulysses)
    # 5 requests in 2 shape groups (3 rows, 2 x 2 rows with CFG) x 2 steps
    expected_mb = 2 * (3 + 4) if microbatches == 0 else 2 * (2 + 2)
    assert all(r["mb"] == expected_mb for r in results), [r["mb"] for r in results]


def test_block_ranges_follow_get_pp_indices() -> None:
    assert block_ranges(2, 2) == [(0, 1), (1, 2)]
    assert block_ranges(57, 4) == [(0, 14), (14, 28), (28, 43), (43, 57)]  # FLUX.1: 19 + 38 blocks
    assert block_ranges(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    with pytest.raises(PipelineError, match=r"stages.denoiser.parallel.pp = 3: the model has 2 transformer "
                                            r"block\(s\).*allowed: pp <= 2"):
        block_ranges(2, 3)


def test_split_rows() -> None:
    assert split_rows(5, 2) == [(0, 3), (3, 5)]
    assert split_rows(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert split_rows(4, 1) == [(0, 4)]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pp_mode": "gpipe"}, "pp_mode 'gpipe' is not known; allowed: layer, pipefusion"),
    ({"pp_microbatches": -1}, "pp_microbatches must be an integer >= 0"),
    ({"pipefusion_patches": True}, "pipefusion_patches must be an integer >= 0"),
    ({"pipefusion_warmup": 1.5}, "pipefusion_warmup must be an integer >= 0"),
])
def test_spec_rejects_bad_pp_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ParallelSpecError, match=message.replace("(", r"\(")):
        ParallelSpec(pp=2, **kwargs)


def test_partitioned_model_loads_only_its_share(tiny_dir: Path) -> None:
    """One process, a fake pp group: the meta model is cut before loading, so the loader reads only the keys of
    the stage (the tensors of the other stage are never read: their keys are not in the state dict)."""
    from omni_runtime.parallel.group_coordinator import GroupCoordinator
    from omni_runtime.stages.models.flux.transformer import FluxTransformer

    full = FluxTransformer.from_pretrained(tiny_dir / "transformer")
    total = sum(p.numel() for p in full.parameters())
    counts = []
    for rank in range(2):
        group = GroupCoordinator.single(rank)
        group.world_size, group.rank_in_group = 2, rank
        part = FluxTransformer.from_pretrained(tiny_dir / "transformer", pp_group=group)
        counts.append(sum(p.numel() for p in part.parameters()))
        for name, p in part.named_parameters():
            assert torch.equal(p, full.get_parameter(name)), name
    assert sum(counts) == total
    assert counts[0] == sum(p.numel() for n, p in full.named_parameters()
                            if n.startswith(("time_text_embed", "context_embedder", "x_embedder",
                                             "transformer_blocks.0.")))


def test_check_prints_block_ranges_and_rejects_pp_above_the_block_count(tiny_dir: Path) -> None:
    from omni_runtime.runtime.config import ConfigError
    from omni_runtime.runtime.config_load import config_from_dict
    from omni_runtime.runtime.preflight import pipeline_lines, preflight

    def cfg(pp: int, ulysses: int = 1):
        return config_from_dict({"model": {"path": str(tiny_dir)},
                                 "stages": {"denoiser": {"parallel": {"pp": pp, "ulysses": ulysses}}}})

    assert pipeline_lines(cfg(2, 2)) == [
        "  pp stages (2 blocks: 1 transformer_blocks + 1 single_transformer_blocks):",
        "    pp rank 0 (ranks [0, 1]): blocks [0, 1) = transformer_blocks[0:1] + embedders",
        "    pp rank 1 (ranks [2, 3]): blocks [1, 2) = single_transformer_blocks[0:1] + head"]
    with pytest.raises(ConfigError, match=r"^stages.denoiser.parallel.pp = 3: the model has 2 transformer "
                                          r"block\(s\) and every pipeline stage needs at least one; allowed: pp <= 2"):
        preflight(cfg(3), model=False)
