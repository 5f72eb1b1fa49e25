"""Mixed image sizes in one forward ([stages.denoiser] mixed_sizes, stages/step_batch.py): rows padded to the
longest, per-row rotary positions, the padding masked out of attention as keys. Each request's latents equal its
solo run (rel <= 1e-4) while the requests share one forward per step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_step_batch import _rel, _req  # one request builder for the running-set tests

from omni_runtime.stages.denoiser import DenoiseRequest, DenoiserStage
from omni_runtime.stages.latents import latent_image_ids
from omni_runtime.stages.step_batch import RunningSet, padding_waste

REL = 1e-4


@pytest.fixture(scope="module")
def stage(tiny_dir: Path) -> DenoiserStage:
    return DenoiserStage.from_pretrained(tiny_dir, mixed_sizes=True)


def _together(stage: DenoiserStage, reqs: list[DenoiseRequest]) -> tuple[dict[int, torch.Tensor], int, list[float]]:
    """Run ``reqs`` from step 0 in one running set; (latents by index, model forwards, padding waste per step)."""
    calls = []
    hook = stage.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        rs = RunningSet(stage)
        for k, r in enumerate(reqs):
            rs.admit(k, r)
        out: dict[int, torch.Tensor] = {}
        waste = []
        while len(rs):
            out.update(rs.step())
            waste.append(rs.padding_waste)
    finally:
        hook.remove()
    return out, len(calls), waste


def _solo(stage: DenoiserStage, r: DenoiseRequest) -> torch.Tensor:
    return stage.denoise([r])[0]


def test_two_sizes_share_one_forward_and_equal_solo(stage: DenoiserStage) -> None:
    reqs = [_req(0, 3, False, (256, 256)), _req(1, 3, False, (272, 208))]
    assert stage.join_key(reqs[0]) == stage.join_key(reqs[1])
    solo = [_solo(stage, r) for r in reqs]
    got, forwards, waste = _together(stage, reqs)
    assert forwards == 3  # one forward per step for both requests
    tokens = [256, 17 * 13]
    assert waste == [pytest.approx(padding_waste(tokens))] * 3
    assert 0 < waste[0] < 0.1
    for k, r in enumerate(solo):
        assert got[k].shape == r.shape
        assert _rel(got[k], r) <= REL, (k, _rel(got[k], r))


def test_true_cfg_and_plain_request_of_different_sizes_equal_solo(stage: DenoiserStage) -> None:
    reqs = [_req(2, 4, True, (272, 208)), _req(3, 2, False, (256, 256))]
    solo = [_solo(stage, r) for r in reqs]
    got, forwards, waste = _together(stage, reqs)
    assert forwards == 4
    # step 1-2: cfg request 2 rows of 221 + plain 1 row of 256; then the cfg request alone
    assert waste[0] == pytest.approx(padding_waste([221, 221, 256])) and waste[2:] == [0.0, 0.0]
    for k, r in enumerate(solo):
        assert _rel(got[k], r) <= REL, (k, _rel(got[k], r))


def test_without_the_switch_sizes_do_not_join(tiny_dir: Path, stage: DenoiserStage) -> None:
    plain = DenoiserStage(stage.model, stage.config, stage.schedule, stage.vae_scale_factor, stage.dtype,
                          stage.device, family=stage.family)
    a, b = _req(0, 3, False, (256, 256)), _req(1, 3, False, (272, 208))
    assert plain.join_key(a) != plain.join_key(b)
    assert stage.row_tokens(a) == (256, 1) and stage.row_tokens(_req(2, 3, True, (272, 208))) == (221, 2)


def test_per_row_img_ids_equal_shared_ids_and_padding_is_masked(stage: DenoiserStage) -> None:
    model = stage.model
    g = torch.Generator().manual_seed(5)
    ids_a = latent_image_ids(128, 128, 8, "cpu", torch.float32)  # 64 tokens
    ids_b = latent_image_ids(96, 112, 8, "cpu", torch.float32)   # 42 tokens
    x = torch.randn(2, 64, 64, generator=g)
    kw = dict(encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
              pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.5, 0.7]),
              txt_ids=torch.zeros(8, 3))
    if stage.guidance_embeds:
        kw["guidance"] = torch.tensor([3.0, 4.0])
    # (rows, tokens, 3) with equal rows == the diffusers (tokens, 3) form
    shared = model(hidden_states=x, img_ids=ids_a, **kw)
    per_row = model(hidden_states=x, img_ids=torch.stack([ids_a, ids_a]), **kw)
    assert _rel(per_row, shared) <= 1e-6
    # row 1 padded from 42 to 64 tokens (garbage in the padding): its first 42 outputs equal its own forward
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 42:] = False
    ids = torch.stack([ids_a, torch.cat([ids_b, torch.full((22, 3), 7.0)])])
    mixed = model(hidden_states=x, img_ids=ids, key_padding_mask=mask, **kw)
    alone = model(hidden_states=x[1:, :42], img_ids=ids_b, **{k: (v[1:] if k != "txt_ids" else v)
                                                              for k, v in kw.items()})
    assert _rel(mixed[1, :42], alone[0]) <= 1e-5
    assert _rel(mixed[0], shared[0]) <= 1e-5
    with pytest.raises(ValueError, match="key_padding_mask"):
        model(hidden_states=x, img_ids=ids, key_padding_mask=mask[:, :10], **kw)
    with pytest.raises(ValueError, match="img_ids"):
        model(hidden_states=x, img_ids=torch.stack([ids_a] * 3), **kw)


def test_padding_waste() -> None:
    assert padding_waste([]) == 0.0
    assert padding_waste([10, 10]) == 0.0
    assert padding_waste([10, 5]) == pytest.approx(0.25)


def test_sizes_with_equal_token_counts_keep_their_own_positions(stage: DenoiserStage) -> None:
    # 256x128 and 128x256 both have 128 image tokens but other rotary positions: no padding, per-row img_ids
    reqs = [_req(5, 2, False, (256, 128)), _req(6, 2, True, (128, 256))]
    solo = [_solo(stage, r) for r in reqs]
    got, forwards, waste = _together(stage, reqs)
    assert forwards == 2 and waste == [0.0, 0.0]
    for k, r in enumerate(solo):
        assert _rel(got[k], r) <= REL, (k, _rel(got[k], r))


class _Mesh:
    """Just the degrees the stage asks of a mesh."""

    def __init__(self, **sizes: int) -> None:
        self.sizes = sizes

    def size(self, axis: str) -> int:
        return self.sizes.get(axis, 1)


@pytest.mark.parametrize("axis", ["sp", "pp"])
def test_the_stage_refuses_mixed_sizes_over_sequence_or_pipeline_ranks(stage: DenoiserStage, axis: str) -> None:
    # the config refuses it first (tests/test_step_scheduler.py); this guards direct users of the stage
    with pytest.raises(ValueError, match=f"mixed_sizes needs sp = pp = 1.*{axis} = 2"):
        DenoiserStage(stage.model, stage.config, stage.schedule, stage.vae_scale_factor, stage.dtype, stage.device,
                      _Mesh(**{axis: 2}), family=stage.family, mixed_sizes=True)
