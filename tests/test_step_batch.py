"""The denoiser's running set (stages/step_batch.py): requests with their own step counts and CFG join and leave
between steps, and each one's latents equal its solo run (rel <= 1e-4; bit-identical with batch_invariant)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from stage_refs import flux_request

from omni_runtime.stages.denoiser import DenoiseRequest, DenoiserStage
from omni_runtime.stages.step_batch import RunningSet

REL = 1e-4


@pytest.fixture(scope="module")
def stage(tiny_dir: Path) -> DenoiserStage:
    return DenoiserStage.from_pretrained(tiny_dir)


def _req(seed: int, steps: int, cfg: bool, size: tuple[int, int] = (64, 64)) -> DenoiseRequest:
    g = torch.Generator().manual_seed(1000 + seed)
    kw = {}
    if cfg:
        kw = dict(negative_prompt_embeds=torch.randn(8, 32, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(32, generator=g), true_cfg_scale=2.5)
    return flux_request(prompt_embeds=torch.randn(8, 32, generator=g), pooled_prompt_embeds=torch.randn(32, generator=g),
                          seed=seed, height=size[1], width=size[0], num_inference_steps=steps,
                          guidance_scale=2.0 + seed, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _staggered(stage: DenoiserStage, reqs: list[DenoiseRequest], joins: list[int], *,
               invariant: bool = False, drop: dict[int, int] | None = None) -> dict[int, torch.Tensor]:
    """Run ``reqs`` through one running set, request k joining before global step ``joins[k]`` (and leaving
    before step ``drop[k]``)."""
    rs = RunningSet(stage, batch_invariant=invariant)
    out: dict[int, torch.Tensor] = {}
    step = 0
    while len(out) + len(drop or {}) < len(reqs):
        for k, j in enumerate(joins):
            if j == step:
                rs.admit(k, reqs[k])
        for k, d in (drop or {}).items():
            if d == step:
                assert rs.drop(k)
        out.update(rs.step())
        step += 1
        assert step < 100
    return out


def test_mixed_steps_and_cfg_joining_at_different_steps_equal_solo(stage: DenoiserStage) -> None:
    reqs = [_req(0, 3, False), _req(1, 7, True), _req(2, 12, False), _req(3, 7, False), _req(4, 3, True)]
    solo = [stage.denoise([r])[0] for r in reqs]
    got = _staggered(stage, reqs, joins=[0, 0, 1, 4, 5])
    for k, r in enumerate(solo):
        assert got[k].shape == r.shape
        assert _rel(got[k], r) <= REL, (k, _rel(got[k], r))


def test_batch_invariant_is_bit_identical_to_solo(tiny_dir: Path, stage: DenoiserStage) -> None:
    inv = DenoiserStage(stage.model, stage.config, stage.schedule, stage.vae_scale_factor, stage.dtype,
                        stage.device, family=stage.family, batch_invariant=True)
    reqs = [_req(0, 3, False), _req(1, 7, True), _req(2, 5, False)]
    solo = [inv.denoise([r])[0] for r in reqs]
    got = _staggered(inv, reqs, joins=[0, 1, 2], invariant=True)
    for k, r in enumerate(solo):
        assert torch.equal(got[k], r), k


def test_dropped_request_leaves_and_the_others_are_unaffected(stage: DenoiserStage) -> None:
    reqs = [_req(0, 6, False), _req(1, 6, True), _req(2, 6, False)]
    solo = [stage.denoise([r])[0] for r in reqs]
    got = _staggered(stage, reqs, joins=[0, 0, 0], drop={1: 2})
    assert set(got) == {0, 2}
    for k in (0, 2):
        assert _rel(got[k], solo[k]) <= REL


def test_join_key_separates_sizes_and_groups_steps_and_cfg(stage: DenoiserStage) -> None:
    a, b, c = _req(0, 3, False), _req(1, 9, True), _req(2, 3, False, size=(64, 48))
    assert stage.join_key(a) == stage.join_key(b) != stage.join_key(c)
    # different join keys in one set run as separate forwards, each still equal to its solo run
    got = _staggered(stage, [a, c], joins=[0, 0])
    assert _rel(got[1], stage.denoise([c])[0]) <= REL


def test_progress_and_admit_errors(stage: DenoiserStage) -> None:
    rs = RunningSet(stage)
    rs.admit(7, _req(0, 4, False))
    rs.step()
    assert rs.progress(7) == (1, 4)
    with pytest.raises(ValueError, match="request id 7 is already running"):
        rs.admit(7, _req(1, 4, False))
    from omni_runtime.stages.errors import RequestError

    with pytest.raises(RequestError, match="height=100"):
        rs.admit(8, _req(1, 4, False, size=(64, 100)))
    assert 8 not in rs and len(rs) == 1
