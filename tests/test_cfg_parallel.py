"""CFG parallel (``parallel.strategies.cfg_parallel``) and the guidance declarations (``stages.guidance``).

* How rows are dealt to the cfg ranks, and what the combines compute (no processes).
* Multi-branch guidance, N = 3 (InstructPix2Pix's text + image guidance) and N = 4 (composable guidance), with a
  small synthetic denoiser (a real module with weights) on cfg 2 and cfg 3 (real gloo processes): every rank ends
  with latents equal to the single-process run (rel <= 1e-5), each rank computed only its share (no dummy
  forward on a rank without rows) and the step sent one all-gather of the padded share.
* The Flux denoiser (tiny model) on cfg 2, with and without true CFG, against its single-process run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from spawn import on_mesh, run_workers

from omni_runtime.parallel.strategies.cfg_parallel import CFGParallel, assign_rows
from omni_runtime.parallel.strategies.row_forward import LocalForward, RowInfo
from omni_runtime.stages.guidance import (
    TEXT_IMAGE_GUIDANCE,
    TRUE_CFG,
    UNGUIDED,
    Guidance,
    composable_guidance,
)

# ------------------------------------------------------------------------------------------- row assignment


def _info(requests: int, branches: int) -> list[RowInfo]:
    return [RowInfo(request=r, branch=k, branches=branches) for k in range(branches) for r in range(requests)]


@pytest.mark.parametrize("requests, branches, degree, shares", [
    (1, 2, 2, [[0], [1]]),                    # true CFG, one request: cond on rank 0, uncond on rank 1
    (2, 2, 2, [[0, 1], [2, 3]]),              # two requests: rank 0 both conds, rank 1 both unconds
    (1, 3, 2, [[0, 2], [1]]),                 # N = 3 round-robin: rank 1 has fewer rows (waits in the gather)
    (1, 4, 3, [[0, 3], [1], [2]]),
    (3, 1, 2, [[0, 2], [1]]),                 # no negative branch: data parallel over requests
    (1, 1, 2, [[0], []]),                     # one row: rank 1 computes nothing
    (2, 3, 2, [[0, 3, 4], [1, 2, 5]]),        # rows (r, k) at 0:(0,0) 1:(1,0) 2:(0,1) 3:(1,1) 4:(0,2) 5:(1,2)
])
def test_rows_are_dealt_round_robin_by_request_then_branch(requests, branches, degree, shares):
    got = assign_rows(_info(requests, branches), degree)
    assert got == shares
    assert sorted(j for s in got for j in s) == list(range(requests * branches))
    assert max(map(len, got)) - min(map(len, got)) <= 1


def test_assign_rows_keeps_requests_in_their_order_of_appearance():
    info = [RowInfo(request=7, branch=0), RowInfo(request=3, branch=0), RowInfo(request=7, branch=1),
            RowInfo(request=3, branch=1)]
    assert assign_rows(info, 2) == [[0, 1], [2, 3]]  # request 7 first: (7,0) (7,1) (3,0) (3,1) -> 0 1 0 1
    with pytest.raises(ValueError, match="degree = 0"):
        assign_rows(info, 0)


def test_cfg_parallel_of_one_rank_is_the_local_forward():
    from omni_runtime.parallel.group_coordinator import GroupCoordinator

    model = _Synth()
    rows, shared, info = _rows(model, 2, composable_guidance(3))
    got = CFGParallel(GroupCoordinator.single(0, "cfg"), LocalForward())(model, rows, shared, info)
    assert torch.equal(got, LocalForward()(model, rows, shared, info))


# ------------------------------------------------------------------------------------------- combines


def _repeat(guide: Guidance, t: torch.Tensor) -> torch.Tensor:
    """``t`` (one row per request) once per branch, branch-major (the synthetic loop's row layout)."""
    return t if guide.branches == 1 else torch.cat([t] * guide.branches)


def _row_info(guide: Guidance, requests: list[int], step: int) -> list[RowInfo]:
    return [RowInfo(request=r, branch=k, branches=guide.branches, step=step)
            for k in range(guide.branches) for r in requests]


def _apply(guide: Guidance, pred: torch.Tensor, scales: list[tuple[float, ...]]) -> torch.Tensor:
    """Each request's combined prediction from branch-major rows."""
    b = len(scales)
    assert pred.shape[0] == guide.branches * b
    if guide.branches == 1:
        return pred
    return torch.stack([guide.combine([pred[k * b + j] for k in range(guide.branches)], scales[j])
                        for j in range(b)])


def test_true_cfg_is_fluxpipelines_formula_row_by_row():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    scales = [4.0, 1.5, 7.25]
    got = _apply(TRUE_CFG, torch.cat([cond, uncond]), [(s,) for s in scales])
    want = torch.stack([u + s * (c - u) for c, u, s in zip(cond, uncond, scales, strict=True)])
    assert torch.equal(got, want)  # bit for bit: the served true-CFG image must not move
    assert UNGUIDED.branches == 1 and torch.equal(UNGUIDED.combine([cond[0]], ()), cond[0])


def test_multi_branch_combines():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)  # one request, 4 branches
    c1, c2, c3, u = p
    got = _apply(composable_guidance(4), p, [(2.0, 0.5, -1.0)])[0]
    assert torch.allclose(got, u + 2.0 * (c1 - u) + 0.5 * (c2 - u) - 1.0 * (c3 - u))
    ti, im, un = p[:3]
    got = _apply(TEXT_IMAGE_GUIDANCE, p[:3], [(7.5, 1.5)])[0]
    assert torch.allclose(got, un + 1.5 * (im - un) + 7.5 * (ti - im))
    with pytest.raises(ValueError, match="2 scale"):
        _apply(composable_guidance(4), p, [(1.0, 2.0)])
    with pytest.raises(ValueError, match="branches = 1"):
        composable_guidance(1)
    with pytest.raises(ValueError, match="branches = 0"):
        Guidance("bad", 0, TRUE_CFG.combine)


# ------------------------------------------------------------------------------------------- synthetic denoiser

TOKENS, CHANNELS, SEQ, WIDTH = 6, 8, 5, 12


class _Synth(torch.nn.Module):
    """A small denoiser with weights: the prediction of a row depends on its latents, timestep and conditioning."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.inp = torch.nn.Linear(CHANNELS, 32)
        self.cond = torch.nn.Linear(WIDTH, 32)
        self.time = torch.nn.Linear(1, 32)
        self.out = torch.nn.Linear(32, CHANNELS)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                offset: torch.Tensor) -> torch.Tensor:
        h = (self.inp(hidden_states) + self.cond(encoder_hidden_states).mean(1, keepdim=True)
             + self.time(timestep[:, None])[:, None])
        return self.out(torch.tanh(h)) + offset


def _conditioning(requests: int, branches: int) -> torch.Tensor:
    """(branches * requests, SEQ, WIDTH), branch-major: each (request, branch) its own conditioning."""
    g = torch.Generator().manual_seed(99 + 10 * branches + requests)
    return torch.randn(branches * requests, SEQ, WIDTH, generator=g)


def _rows(model: _Synth, requests: int, guide: Guidance) -> tuple[dict, dict, list[RowInfo]]:
    lat = torch.randn(requests, TOKENS, CHANNELS, generator=torch.Generator().manual_seed(5))
    rows = {"hidden_states": _repeat(guide, lat), "timestep": torch.full((guide.branches * requests,), 0.5),
            "encoder_hidden_states": _conditioning(requests, guide.branches)}
    return rows, {"offset": torch.full((TOKENS, CHANNELS), 0.01)}, _row_info(guide, list(range(requests)), 0)


#: (guidance, scales per request, steps): N = 3 and N = 4, one and several requests, and no guidance (rows < cfg)
SYNTH_CASES: list[tuple[str, list[tuple[float, ...]], int]] = [
    ("text_image", [(7.5, 1.5)], 3),
    ("text_image", [(7.5, 1.5), (3.0, 2.0), (5.0, 1.0)], 2),
    ("composable4", [(2.0, 0.5, 1.5)], 3),
    ("composable4", [(2.0, 0.5, 1.5), (1.0, 3.0, 0.25)], 2),
    ("none", [(), ()], 2),
]
GUIDES = {"text_image": TEXT_IMAGE_GUIDANCE, "composable4": composable_guidance(4), "none": UNGUIDED}


class _Counting:
    """An inner RowForward that records how many rows each call computed."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.local = LocalForward()

    def __call__(self, model, rows, shared, info):
        self.calls.append(len(info))
        return self.local(model, rows, shared, info)


def _synth_denoise(forward, guide: Guidance, scales: list[tuple[float, ...]], steps: int) -> torch.Tensor:
    model = _Synth()
    b = len(scales)
    latents = torch.stack([torch.randn(TOKENS, CHANNELS, generator=torch.Generator().manual_seed(40 + j))
                           for j in range(b)])
    cond = _conditioning(b, guide.branches)
    offset = torch.full((TOKENS, CHANNELS), 0.01)
    with torch.no_grad():
        for i in range(steps):
            t = 1.0 - i / steps
            rows = {"hidden_states": _repeat(guide, latents), "timestep": torch.full((guide.branches * b,), t),
                    "encoder_hidden_states": cond}
            pred = forward(model, rows, {"offset": offset}, _row_info(guide, list(range(b)), i))
            latents = latents - (1.0 / steps) * _apply(guide, pred, scales)
    return latents


def _synth_worker(rank: int, world_size: int, store: str) -> dict:
    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec
    from omni_runtime.parallel.strategies.row_forward import row_forward_for

    torch.manual_seed(rank)  # the strategy must not depend on a rank's global RNG
    mesh = Mesh.build(ParallelSpec(cfg=world_size), rank, f"file://{store}", "cpu")
    try:
        picked = row_forward_for(mesh)
        assert isinstance(picked, CFGParallel) and isinstance(picked.inner, LocalForward), picked
        out = []
        for name, scales, steps in SYNTH_CASES:
            inner = _Counting()
            forward = CFGParallel(mesh.group("cfg"), inner)
            mesh.reset_comm_stats()
            latents = _synth_denoise(forward, GUIDES[name], scales, steps)
            stats = mesh.comm_stats()
            out.append({"latents": latents.flatten().tolist(), "calls": inner.calls, "gathers":
                        stats.calls.get("all_gather", 0), "bytes": stats.bytes_sent})
        return {"cases": out}
    finally:
        mesh.destroy()


@pytest.mark.distributed
@pytest.mark.parametrize("cfg", [2, 3])
def test_multi_branch_cfg_parallel_equals_the_single_process_run(tmp_path: Path, cfg: int) -> None:
    results = run_workers(_synth_worker, cfg, args=(str(tmp_path / "store"),), timeout=120)
    row_bytes = TOKENS * CHANNELS * 4
    for c, (name, scales, steps) in enumerate(SYNTH_CASES):
        guide = GUIDES[name]
        want = _synth_denoise(LocalForward(), guide, scales, steps)
        n_rows = guide.branches * len(scales)
        shares = assign_rows(_row_info(guide, list(range(len(scales))), 0), cfg)
        for rank, res in enumerate(results):
            case = res["cases"][c]
            got = torch.tensor(case["latents"]).view_as(want)
            rel = ((got - want).abs().max() / want.abs().max()).item()
            assert rel <= 1e-5, (name, cfg, rank, rel)
            assert case["latents"] == results[0]["cases"][c]["latents"], f"rank {rank} differs from rank 0"
            # its share only, every step; a rank without rows ran no forward at all
            mine = len(shares[rank])
            assert case["calls"] == ([mine] * steps if mine else []), (name, rank, case["calls"])
            # one all-gather per step, of the largest share (padded), to the cfg - 1 peers
            width = max(map(len, shares))
            assert case["gathers"] == steps
            assert case["bytes"] == steps * width * row_bytes * (cfg - 1)
        assert sum(map(len, shares)) == n_rows


# ------------------------------------------------------------------------------------------- Flux denoiser

FLUX_CASES = [  # (prompt, negative prompt or None, seed, height, width, true_cfg_scale)
    ("a red cube", "blurry", 3, 208, 144, 4.0),
    ("a lighthouse", "fog", 5, 128, 128, 2.5),
    ("the dog on the sofa", None, 2, 208, 144, 1.0),
    ("a photo of a cat", None, 1, 208, 144, 1.0),
    ("a boat", None, 7, 128, 128, 1.0),
]


def _flux_cases(model_dir: str, mesh=None) -> dict:
    from stage_refs import encoded_requests

    from omni_runtime.stages import DenoiserStage, TextEncoderStage

    te = TextEncoderStage.from_pretrained(model_dir, "float32", "cpu")
    den = DenoiserStage.from_pretrained(model_dir, "float32", "cpu", mesh=mesh)
    seen: list[int] = []
    den.model.transformer_blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    reqs = encoded_requests(te, FLUX_CASES, 2, 16)
    latents = den.denoise(reqs)
    rows_seen = list(seen)
    # a true-CFG batch of 2 that loses request 0 before step 1 (cancelled): 4 rows, then 2
    pair = [dataclasses.replace(reqs[1], seed=11, true_cfg_scale=6.0, num_inference_steps=3),
            dataclasses.replace(reqs[1], num_inference_steps=3)]
    seen.clear()
    stopped = den.denoise(pair, stop=lambda step: [0] if step == 1 else [])
    rows_seen.append(sum(seen))
    assert stopped[0] is None
    return {"rows_seen": rows_seen, "latents": [x.flatten().tolist() for x in latents],
            "stopped": stopped[1].flatten().tolist()}


@pytest.mark.distributed
@pytest.mark.slow
def test_flux_denoiser_on_cfg2_equals_the_single_process_run(tiny_dir: Path, tmp_path: Path) -> None:
    ref = _flux_cases(str(tiny_dir))
    results = run_workers(on_mesh, 2, args=({"cfg": 2}, str(tmp_path / "store"), _flux_cases, str(tiny_dir)),
                          timeout=240)
    # batches (one forward each, 2 steps): 208x144 true CFG (1 req), 128x128 true CFG (1), 208x144 plain (2),
    # 128x128 plain (1). Single process: 2, 2, 2, 1 rows per forward; cfg 2: every rank 1 row, but the lone plain
    # 128x128 request runs on rank 0 only.
    assert ref["rows_seen"] == [2, 2, 2, 2, 2, 2, 1, 1, 4 + 2 + 2]  # last: the stopped pair's rows, 3 steps
    assert results[0]["rows_seen"] == [1] * 8 + [2 + 1 + 1]
    assert results[1]["rows_seen"] == [1] * 6 + [2 + 1 + 1]
    for rank, res in enumerate(results):
        assert res["latents"] == results[0]["latents"], f"rank {rank} latents differ from rank 0"
    for i, case in enumerate(FLUX_CASES):
        got, want = torch.tensor(results[0]["latents"][i]), torch.tensor(ref["latents"][i])
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel <= 1e-5, f"case {case}: latent relative error {rel:.3g}"
    got, want = torch.tensor(results[0]["stopped"]), torch.tensor(ref["stopped"])
    assert results[1]["stopped"] == results[0]["stopped"]
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


# ------------------------------------------------------------------------------------------- config

BASE = '[model]\npath = "models/m"\n'


def _load(tmp_path: Path, text: str):
    from omni_runtime.runtime.config_load import load_config

    p = tmp_path / "c.toml"
    p.write_text(BASE + text)
    return load_config(p)


@pytest.mark.parametrize("text, world", [
    ("[stages.denoiser.parallel]\ncfg = 2\n", 2),
    ("[stages.denoiser.parallel]\ncfg = 3\n", 3),
    ("[stages.denoiser.parallel]\ncfg = 2\nulysses = 2\n", 4),
    ("[stages.denoiser.parallel]\ncfg = 2\nring = 2\n", 4),
    ("[stages.denoiser]\nmax_batch_size = 1\n[stages.denoiser.parallel]\ncfg = 2\n", 2),
])
def test_config_accepts_cfg_and_sizes_the_replica(tmp_path: Path, text: str, world: int) -> None:
    cfg = _load(tmp_path, text)
    assert cfg.stages.denoiser.world_size == world
    assert cfg.stages.denoiser.parallel.cfg == int(text.split("cfg = ")[1][0])


@pytest.mark.parametrize("text, message", [
    ("cfg = 0\n", r"^stages\.denoiser\.parallel\.cfg = 0: must be an integer >= 1$"),
    ("cfg = -2\n", r"^stages\.denoiser\.parallel\.cfg = -2: must be an integer >= 1$"),
    ("cfg = '2'\n", r"^stages\.denoiser\.parallel\.cfg = '2' \(str\): must be an integer$"),
    ("cfg = true\n", r"^stages\.denoiser\.parallel\.cfg = True \(bool\): must be an integer$"),
    ("cfg = 1.5\n", r"^stages\.denoiser\.parallel\.cfg = 1\.5 \(float\): must be an integer$"),
    ("cfg = 17\n", r"^stages\.denoiser\.parallel\.cfg = 17 with stages\.denoiser\.max_batch_size = 8: a denoising "
                   r"step has at most 2 branches \(true CFG\) x 8 request\(s\) = 16 rows, so cfg rank\(s\) 16 to 16 "
                   r"would never compute; allowed: cfg <= 16"),
    ("cfg = 2\nhsdp_shard = 2\n", r"^stages\.denoiser\.parallel\.cfg = 2 with hsdp_shard = 2: not supported yet;"
                                  r" .*allowed: one of them \(cfg = 1 or hsdp_shard = 1\)"),
    ("cfg = 2\nulysses = 2\nhsdp_shard = 2\n", r"^stages\.denoiser\.parallel\.hsdp_shard = 2 .*does not equal the "
                                               r"world size tp 1 × ulysses 2 × ring 1 × pp 1 × cfg 2 × dp 1 = 4"),
    ("cfg = 2\ndp = 2\nep = 2\n", r"^stages\.denoiser\.parallel\.cfg = 2 with ep = 2: not supported yet"),
    ("cfg = 2\ndp = 2\n", r"^stages\.denoiser\.parallel\.dp = 2: not supported yet"),
])
def test_config_rejects_bad_cfg_values_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    from omni_runtime.runtime.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, "[stages.denoiser.parallel]\n" + text)


def test_config_cfg_rules_that_involve_other_tables(tmp_path: Path) -> None:
    from omni_runtime.runtime.config import ConfigError

    with pytest.raises(ConfigError, match=r"^stages\.denoiser\.parallel\.cfg = 3 with stages\.denoiser\."
                                          r"max_batch_size = 1: .* = 2 rows, so cfg rank\(s\) 2 to 2 would never "
                                          r"compute; allowed: cfg <= 2"):
        _load(tmp_path, "[stages.denoiser]\nmax_batch_size = 1\n[stages.denoiser.parallel]\ncfg = 3\n")
    with pytest.raises(ConfigError, match=r"^stages\.denoiser\.devices = .*lists 2 devices, but 1 replica\(s\) x 4 "
                                          r"rank\(s\) need exactly 4"):
        _load(tmp_path, "[stages.denoiser]\ndevices = ['cpu', 'cpu']\n[stages.denoiser.parallel]\ncfg = 2\n"
                        "ulysses = 2\n")


def test_check_prints_every_ranks_cfg_group(capsys) -> None:
    from omni_runtime.runtime.cli import main

    root = Path(__file__).resolve().parent.parent
    assert main(["check", str(root / "configs" / "cfg2.toml")]) == 0
    out = capsys.readouterr().out
    assert "stage denoiser: 1 replica(s) x 2 rank(s)" in out and "parallel: cfg 2" in out
    assert "denoiser[0] rank 0/2 on cpu: world=[0, 1] cfg=[0, 1] (node" in out
    assert "denoiser[0] rank 1/2 on cpu: world=[0, 1] cfg=[0, 1] (node" in out
    assert main(["check", str(root / "configs" / "cfg2_usp2.toml")]) == 0
    out = capsys.readouterr().out
    assert "parallel: cfg 2 × ulysses 2" in out
    for rank, sp, cfg in ((0, [0, 1], [0, 2]), (1, [0, 1], [1, 3]), (2, [2, 3], [0, 2]), (3, [2, 3], [1, 3])):
        assert f"denoiser[0] rank {rank}/4 on cpu: world=[0, 1, 2, 3] sp={sp} ulysses={sp} cfg={cfg} (node" in out
    assert "total processes: 6 rank(s) + 1 frontend" in out


def test_mixed_guidance_rows_combine_like_each_guidance_alone():
    from omni_runtime.stages.guidance import mixed_apply, mixed_rows

    guides = [TRUE_CFG, UNGUIDED, composable_guidance(4), TRUE_CFG]
    requests, scales = [10, 11, 12, 13], [(4.0,), (), (2.0, 0.5, 1.5), (1.5,)]
    rows = mixed_rows(requests, guides, [3] * len(requests))
    assert [(r.request, r.branch) for r in rows] == [(10, 0), (11, 0), (12, 0), (13, 0), (10, 1), (12, 1), (13, 1),
                                                     (12, 2), (12, 3)]
    assert all(r.step == 3 for r in rows) and [r.branches for r in rows][:4] == [2, 1, 4, 2]
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(len(rows), 5, 4, generator=g)
    got = mixed_apply(pred, rows, requests, guides, scales)
    for j, (r, guide, s) in enumerate(zip(requests, guides, scales, strict=True)):
        mine = torch.stack([pred[i] for i, row in enumerate(rows) if row.request == r])  # branch order
        assert torch.equal(got[j], _apply(guide, mine, [s])[0]), r
    # rows in another order (as a strategy may return them internally) map back by (request, branch)
    perm = torch.randperm(len(rows), generator=g)
    assert torch.equal(mixed_apply(pred[perm], [rows[i] for i in perm], requests, guides, scales), got)
    # one guidance: the branch-major layout of the synthetic loop; each row carries its own request's step
    assert mixed_rows([4, 5], [TRUE_CFG, TRUE_CFG], [0, 0]) == _row_info(TRUE_CFG, [4, 5], 0)
    assert [r.step for r in mixed_rows([4, 5], [TRUE_CFG, UNGUIDED], [2, 7])] == [2, 7, 2]
    with pytest.raises(ValueError, match="8 prediction rows for 9 rows"):
        mixed_apply(pred[:8], rows, requests, guides, scales)
