"""Cache acceleration (issue 26) on the stages: First-Block Cache equals diffusers' ``apply_first_block_cache``
(every step's decision, latents rel <= 1e-4, images <= 2/255) on the tiny Flux model, with and without true CFG
(each branch its own state, as diffusers' ``cache_context``), at a threshold where steps are skipped; threshold 0
equals uncached exactly; per-row state in the running set (a cached, an uncached and a true-CFG cached request
joining at other steps each equal their solo run); the DBCache layout's warm-up and cap; the edge's checks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from stage_refs import decode, denoise_requests, load_stages

from omni_runtime.stages.block_cache import row_key
from omni_runtime.stages.cache_config import CacheConfig, parse_cache
from omni_runtime.stages.errors import RequestError
from omni_runtime.stages.step_batch import RunningSet

PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a red fox", "blurry", 3, 10, 64
THRESHOLD = 0.3  # the tiny model's first-block residual changes by 0.1-0.5 between steps: some steps are skipped
LATENT_RTOL = 1e-4


@pytest.fixture(scope="module")
def stages(tiny_dir):
    return load_stages(tiny_dir)


def _request(stages, cache: CacheConfig | None, cfg: bool = False, steps: int = STEPS, seed: int = SEED):
    kw = {"negative_prompt": NEGATIVE, "true_cfg_scale": 2.0} if cfg else {}
    req = denoise_requests(stages, PROMPT, seed=seed, num_inference_steps=steps, height=SIZE, width=SIZE, **kw)[0]
    return replace(req, cache=cache)


def _run(stages, joins: dict[int, list], record: int | None = None):
    """Run a running set where ``joins[step]`` = [(rid, request)] join before that step; returns the latents by
    rid, the cache stats by rid, and (``record``: a rid) that request's per-step decisions per branch (True =
    its blocks were skipped)."""
    rs = RunningSet(stages.denoiser)
    out, stats, decisions = {}, {}, []
    step = 0
    while step == 0 or rs or any(s >= step for s in joins):
        for rid, req in joins.get(step, []):
            rs.admit(rid, req)
        if not rs:
            step += 1
            continue
        rows = rs.cache.rows
        before = {k: rows[k].cached_steps for k in rows}
        done = rs.step()
        if record is not None and record in rs:
            decisions.append([rows[k].cached_steps > before[k] for k in sorted(before) if k >> 8 == record])
        for rid, lat in done.items():
            out[rid], stats[rid] = lat, rs.cache_stats(rid)
        step += 1
    return out, stats, decisions


def _diffusers(tiny_dir, threshold: float, cfg: bool):
    """diffusers' FluxPipeline with apply_first_block_cache: latents, uint8 image, and each call's decision."""
    from diffusers import FluxPipeline
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    kw = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS)
    if cfg:
        kw.update(negative_prompt=NEGATIVE, true_cfg_scale=2.0)
    outs = []
    for output_type in ("latent", "np"):
        pipe = FluxPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=threshold))
        hook = pipe.transformer.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
        calls: list[bool] = []
        decide = hook._should_compute_remaining_blocks
        hook._should_compute_remaining_blocks = lambda r, decide=decide, calls=calls: (
            calls.append(not decide(r)) or not calls[-1])
        outs.append((pipe(**kw, generator=torch.Generator("cpu").manual_seed(SEED), output_type=output_type)
                     .images[0], calls))
    (lat, calls), (img, _) = outs
    return lat, np.round(img * 255).astype(np.uint8), calls


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "true_cfg"])
def test_first_block_equals_diffusers(stages, tiny_dir, cfg):
    ref_lat, ref_img, calls = _diffusers(tiny_dir, THRESHOLD, cfg)
    branches = 2 if cfg else 1
    ref_decisions = [calls[i:i + branches] for i in range(0, len(calls), branches)]
    out, stats, decisions = _run(stages, {0: [(1, _request(stages, CacheConfig("first_block", THRESHOLD), cfg))]},
                                 record=1)
    assert decisions == ref_decisions[:len(decisions)] and len(decisions) == STEPS - 1
    assert sum(sum(d) for d in ref_decisions) >= 2, "the threshold skips no step: the test would prove nothing"
    s = stats[1]
    assert (s.steps, s.cached_steps) == (STEPS * branches, sum(sum(d) for d in ref_decisions))
    assert s.cached_blocks == s.cached_steps * (stages.denoiser.cache_blocks - 1)
    lat = out[1]
    assert (lat - ref_lat).abs().max() <= LATENT_RTOL * ref_lat.abs().max()
    img = decode(stages, [lat], SIZE, SIZE)[0]
    assert np.abs(img.astype(int) - ref_img.astype(int)).max() <= 2


def test_threshold_zero_equals_uncached_exactly(stages):
    out, _, _ = _run(stages, {0: [(1, _request(stages, None)), (2, _request(stages, CacheConfig("first_block", 0.0))),
                                  (3, _request(stages, CacheConfig("dbcache", 0.0)))]})
    ref, _, _ = _run(stages, {0: [(1, _request(stages, None))]})
    assert torch.equal(out[2], out[1]) and torch.equal(out[3], out[1])
    solo, stats, _ = _run(stages, {0: [(2, _request(stages, CacheConfig("first_block", 0.0)))]})
    assert torch.equal(solo[2], ref[1]) and stats[2].cached_steps == 0


def test_rows_keep_their_own_state(stages):
    """A cached request, an uncached one and a cached true-CFG one joining later share forwards (some rows skip,
    some compute in the same step); each equals its solo run, decisions included."""
    fb = CacheConfig("first_block", THRESHOLD)
    a, b, c = _request(stages, fb), _request(stages, None, steps=6, seed=5), _request(stages, fb, cfg=True, seed=7)
    out, stats, _ = _run(stages, {0: [(1, a), (2, b)], 3: [(3, c)]})
    for rid, req in ((1, a), (2, b), (3, c)):
        solo, solo_stats, _ = _run(stages, {0: [(rid, req)]})
        assert (out[rid] - solo[rid]).abs().max() <= LATENT_RTOL * solo[rid].abs().max(), rid
        assert stats[rid] == solo_stats[rid], rid
    assert stats[2] is None and stats[1].cached_steps > 0 and stats[3].cached_steps > 0


def test_dbcache_warmup_and_cap(stages):
    fb = _run(stages, {0: [(1, _request(stages, CacheConfig("first_block", THRESHOLD)))]}, record=1)
    db = _run(stages, {0: [(1, _request(stages, CacheConfig("dbcache", THRESHOLD)))]}, record=1)
    assert torch.equal(fb[0][1], db[0][1]) and fb[2] == db[2]  # fn 1, bn 0, no warm-up, no cap: first_block
    _, stats, dec = _run(stages, {0: [(1, _request(stages, CacheConfig("dbcache", 0.5, warmup_steps=4)))]}, record=1)
    assert not any(d[0] for d in dec[:4]) and stats[1].cached_steps > 0
    _, stats, dec = _run(stages, {0: [(1, _request(stages, CacheConfig("dbcache", 1.0, max_cached_steps=1)))]},
                         record=1)
    flags = [d[0] for d in dec]
    assert stats[1].cached_steps > 0 and not any(x and y for x, y in zip(flags, flags[1:], strict=False))
    with pytest.raises(RequestError, match=r"cache.fn \+ cache.bn = 1 \+ 1 = 2: must be less than the model's 2"):
        RunningSet(stages.denoiser).admit(1, _request(stages, CacheConfig("dbcache", 0.1, bn=1)))


def test_cache_state_leaves_with_the_request(stages):
    rs = RunningSet(stages.denoiser)
    rs.admit(1, _request(stages, CacheConfig("first_block", THRESHOLD), cfg=True))
    rs.step()
    assert set(rs.cache.rows) == {row_key(1, 0), row_key(1, 1)}
    rs.drop(1)
    assert rs.cache.rows == {}


@pytest.mark.parametrize(("raw", "message"), [
    ("x", "cache: must be an object"),
    ({}, "cache.method=None: allowed values are first_block, dbcache, teacache, none"),
    ({"method": "tea"}, "cache.method='tea': allowed values are first_block, dbcache, teacache, none"),
    ({"method": "teacache", "threshold": 2.5}, "cache.threshold=2.5: must be a number from 0 to 2"),
    ({"method": "first_block", "threshold": -0.1}, r"cache.threshold=-0.1: must be a number from 0 to 1"),
    ({"method": "first_block", "threshold": float("nan")}, "cache.threshold=nan: must be a number from 0 to 1"),
    ({"method": "first_block", "threshold": True}, "cache.threshold=True"),
    ({"method": "first_block", "fn": 2}, "cache.fn: not a key of method 'first_block'; allowed: method, threshold"),
    ({"method": "dbcache", "fn": 0}, "cache.fn=0: must be an integer from 1 to 1000"),
    ({"method": "dbcache", "max_cached_steps": 1.5}, "cache.max_cached_steps=1.5: must be an integer"),
    ({"method": "none", "threshold": 0.1}, "cache.threshold: not a key of method 'none'"),
])
def test_bad_cache_values_name_the_key(raw, message):
    from omni_runtime.runtime.requests import RequestError as EdgeError
    from omni_runtime.runtime.requests import parse_request

    with pytest.raises(ValueError, match=message):
        parse_cache(raw)
    with pytest.raises(EdgeError, match=message) as e:
        parse_request({"prompt": "x", "cache": raw})
    assert e.value.param == "cache" and "allowed" in str(e.value)


def test_cache_field_cli_and_config():
    from omni_runtime.runtime.config import ConfigError
    from omni_runtime.runtime.config_load import config_from_dict
    from omni_runtime.runtime.requests import RequestError as EdgeError
    from omni_runtime.runtime.requests import cache_flag, parse_request

    assert parse_request({"prompt": "x", "cache": cache_flag("first_block:0.2")}).cache == \
        CacheConfig("first_block", 0.2)
    assert parse_request({"prompt": "x", "cache": cache_flag('{"method": "dbcache", "fn": 2}')}).cache == \
        CacheConfig("dbcache", fn=2)
    assert parse_request({"prompt": "x"}).cache is None
    with pytest.raises(EdgeError, match="--cache 'first_block:x': must be METHOD"):
        cache_flag("first_block:x")
    base = {"model": {"path": "x"}}
    assert config_from_dict(base).stages.denoiser.cache.request_default() is None  # off by default
    on = config_from_dict({**base, "stages": {"denoiser": {"cache": {"method": "first_block", "threshold": 0.2}}}})
    assert on.stages.denoiser.cache.request_default() == CacheConfig("first_block", 0.2)
    for bad, message in (({"method": "fbc"}, "stages.denoiser.cache.method='fbc': allowed values"),
                         ({"method": "first_block", "bn": 1}, "stages.denoiser.cache.bn: not a key of method"),
                         ({"method": "dbcache", "threshold": 3}, "stages.denoiser.cache.threshold=3"),
                         ({"method": "first_block", "tresh": 1}, "stages.denoiser.cache.tresh: unknown key")):
        with pytest.raises(ConfigError, match=message):
            config_from_dict({**base, "stages": {"denoiser": {"cache": bad}}})
    with pytest.raises(ConfigError, match="not supported under pipeline parallelism"):
        config_from_dict({**base, "stages": {"denoiser": {"cache": {"method": "first_block"},
                                                          "parallel": {"pp": 2}}}})


class _TeaCacheReference(torch.nn.Module):
    """TeaCache4FLUX's rule written over diffusers' FluxTransformer2DModel blocks (the reference: no code of ours):
    the first block decides from ``norm1``'s modulated input; a skipped step adds the residual (image and text) of
    the whole block stack kept from the last computed step."""

    def __init__(self, block: torch.nn.Module, state: dict, role: str, coefficients, threshold: float,
                 steps: int) -> None:
        super().__init__()
        self.block, self.state, self.role = block, state, role
        self.coefficients, self.threshold, self.steps = coefficients, threshold, steps

    def forward(self, hidden_states, encoder_hidden_states, temb, **kw):
        st = self.state
        if self.role in ("head", "both"):
            mod = self.block.norm1(hidden_states, emb=temb)[0]
            cnt = st.setdefault("cnt", 0)
            if cnt == 0 or cnt == self.steps - 1:
                compute, st["acc"] = True, 0.0
            else:
                rel = ((mod - st["mod"]).abs().mean() / st["mod"].abs().mean()).item()
                st["acc"] += float(np.poly1d(self.coefficients)(rel))
                compute = st["acc"] >= self.threshold
                st["acc"] = 0.0 if compute else st["acc"]
            st["mod"], st["cnt"], st["skip"] = mod, cnt + 1, not compute
            st["decisions"].append(not compute)
            if compute:
                st["in"] = (hidden_states, encoder_hidden_states)
            else:
                return encoder_hidden_states + st["res"][1], hidden_states + st["res"][0]
        if st["skip"]:
            return encoder_hidden_states, hidden_states
        txt, img = self.block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                              **kw)
        if self.role in ("tail", "both"):
            st["res"] = (img - st["in"][0], txt - st["in"][1])
        return txt, img


def test_teacache_equals_its_reference_on_flux(stages, tiny_dir):
    from diffusers import FluxPipeline

    from omni_runtime.stages.models.flux.transformer import FluxTransformer

    threshold, coefficients = 0.5, FluxTransformer._cache_plan.teacache
    pipe = FluxPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    tr = pipe.transformer
    blocks = [*tr.transformer_blocks, *tr.single_transformer_blocks]
    state: dict = {"decisions": []}
    roles = ["head"] + ["mid"] * (len(blocks) - 2) + ["tail"]
    wrapped = [_TeaCacheReference(b, state, r, coefficients, threshold, STEPS) for b, r in zip(blocks, roles, strict=True)]
    tr.transformer_blocks = torch.nn.ModuleList(wrapped[:len(tr.transformer_blocks)])
    tr.single_transformer_blocks = torch.nn.ModuleList(wrapped[len(tr.transformer_blocks):])
    ref = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent",
               generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    out, stats, decisions = _run(stages, {0: [(1, _request(stages, CacheConfig("teacache", threshold)))]}, record=1)
    assert [d[0] for d in decisions] == state["decisions"][:STEPS - 1] and not state["decisions"][-1]
    assert 2 <= stats[1].cached_steps == sum(state["decisions"]) < STEPS - 2
    assert (out[1] - ref).abs().max() <= LATENT_RTOL * ref.abs().max()


def test_teacache_is_refused_where_no_coefficients_are_published(qwen_tiny_dir):
    from omni_runtime.stages import DenoiserStage

    den = DenoiserStage.from_pretrained(qwen_tiny_dir, "float32", "cpu")
    with pytest.raises(RequestError, match="the qwen_image family has no published TeaCache coefficients"):
        den._check_cache(CacheConfig("teacache", 0.3))


def test_mixed_sizes_rows_decide_on_their_real_tokens(stages, tiny_dir):
    """With mixed sizes a shorter row is padded; its residual's L1 is taken over its real tokens only, so two cached
    requests of different sizes in one padded forward each equal their solo run, decisions included."""
    from omni_runtime.stages import DenoiserStage

    mixed = DenoiserStage.from_pretrained(tiny_dir, "float32", "cpu", mixed_sizes=True)
    fb = CacheConfig("first_block", THRESHOLD)
    small = replace(_request(stages, fb), height=48, width=64)
    big = _request(stages, fb, seed=4)
    rs = RunningSet(mixed)
    rs.admit(1, small)
    rs.admit(2, big)
    out, stats = {}, {}
    while rs:
        for rid, lat in rs.step().items():
            out[rid], stats[rid] = lat, rs.cache_stats(rid)
    for rid, req in ((1, small), (2, big)):
        solo, solo_stats, _ = _run(stages, {0: [(rid, req)]})
        assert (out[rid] - solo[rid]).abs().max() <= LATENT_RTOL * solo[rid].abs().max(), rid
        assert stats[rid] == solo_stats[rid] and stats[rid].cached_steps > 0, rid
