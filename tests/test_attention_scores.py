"""The ``scores`` attention backend (materialized scores, parallel/attention/scores.py) against SDPA, the CPU flash
kernel and float64 math: outputs and log-sum-exp, key masks (with a batch row that sees no key), joint text with
its padding mask, bf16, the ``auto`` size limit, and Ring attention over real gloo processes with it.

Tolerances (relative L2 over the tensor): float64 1e-12, fp32 1e-5 (vs float64 math) and 2e-6 (vs SDPA / flash,
both fp32 kernels), bf16 1e-2; rows with no visible key must be exactly out 0 and lse -inf.
"""

from __future__ import annotations

import pytest
import torch
from rel_error import rel, rel_lse
from spawn import run_workers

from omni_runtime.parallel.attention import SPMesh, sp_attention
from omni_runtime.parallel.attention.backends import attention_block, select_backend
from omni_runtime.parallel.attention.scores import SCORES_MAX_BYTES, score_bytes, scores_fit


def inputs(seed: int, n: int = 37, heads: int = 5, dim: int = 16, mask: bool = True, dead: bool = True,
           dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, n, heads, dim, generator=g).to(dtype) for _ in range(3))
    m = None
    if mask:
        m = torch.rand(2, n, generator=g) > 0.3
        m[0, 0] = True
        if dead:
            m[1] = False  # batch row 1 sees no key at all
    return q, k, v, m


@pytest.mark.parametrize("mask,dead", [(False, False), (True, False), (True, True)])
def test_scores_matches_float64_sdpa_and_flash(mask: bool, dead: bool) -> None:
    q, k, v, m = inputs(1, mask=mask, dead=dead)
    ref_o, ref_l = attention_block(q.double(), k.double(), v.double(), key_mask=m, return_lse=True, backend="math")
    out, lse = attention_block(q, k, v, key_mask=m, return_lse=True, backend="scores")
    plain = attention_block(q, k, v, key_mask=m, backend="scores")
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (2, 37, 5)
    assert torch.equal(plain, out)  # one computation with or without the LSE
    assert rel(out, ref_o) <= 1e-5 and rel_lse(lse, ref_l) <= 1e-5
    assert rel(out, attention_block(q, k, v, key_mask=m, backend="sdpa")) <= 2e-6
    f_out, f_lse = attention_block(q, k, v, key_mask=m, return_lse=True, backend="flash_cpu")
    assert rel(out, f_out) <= 2e-6 and rel_lse(lse, f_lse) <= 2e-6
    if dead:
        assert torch.equal(out[1], torch.zeros_like(out[1])) and bool(torch.isneginf(lse[1]).all())
    # float64 in: float64 scores, out and lse
    o64, l64 = attention_block(q.double(), k.double(), v.double(), key_mask=m, return_lse=True, backend="scores")
    assert l64.dtype == torch.float64 and rel(o64, ref_o) <= 1e-12 and rel_lse(l64, ref_l) <= 1e-12


def test_scores_bf16_and_cross_attention_lengths() -> None:
    q, k, v, m = inputs(2, dtype=torch.bfloat16, dead=False)
    out, lse = attention_block(q, k, v, key_mask=m, return_lse=True, backend="scores")
    ref_o, ref_l = attention_block(q.double(), k.double(), v.double(), key_mask=m, return_lse=True, backend="math")
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel(out, ref_o) <= 1e-2 and rel_lse(lse, ref_l) <= 1e-5  # lse from fp32 scores of the bf16 inputs
    # a query block over a key block of another length (what Ring and PipeFusion call)
    q2 = torch.randn(2, 11, 5, 16)
    _, k2, v2, m2 = inputs(3, n=29, dead=False)
    o2, l2 = attention_block(q2, k2, v2, key_mask=m2, return_lse=True, backend="scores")
    r2, rl2 = attention_block(q2.double(), k2.double(), v2.double(), key_mask=m2, return_lse=True, backend="math")
    assert o2.shape == (2, 11, 5, 16) and rel(o2, r2) <= 1e-5 and rel_lse(l2, rl2) <= 1e-5
    # empty blocks: out 0, lse -inf
    e_out, e_lse = attention_block(q2, k2[:, :0], v2[:, :0], return_lse=True, backend="scores")
    assert not bool(e_out.any()) and bool(torch.isneginf(e_lse).all())


@pytest.mark.parametrize("joint", ["front", "rear"])
def test_scores_with_joint_text_and_its_padding_mask(joint: str) -> None:
    q, k, v, m = inputs(4, n=24, dead=False)
    jq, jk, jv, _ = inputs(5, n=9, mask=False)
    jm = torch.ones(2, 9, dtype=torch.bool)
    jm[1, 6:] = False  # batch row 1 has 3 padding text tokens
    kw = dict(joint_q=jq, joint_k=jk, joint_v=jv, joint_strategy=joint, key_padding_mask=m,
              joint_key_padding_mask=jm, return_lse=True)
    out, lse = sp_attention(q, k, v, backend="scores", **kw)
    ref_o, ref_l = sp_attention(*(t.double() for t in (q, k, v)), backend="math",
                                **{**kw, **{n: kw[n].double() for n in ("joint_q", "joint_k", "joint_v")}})
    assert rel(out, ref_o) <= 1e-5 and rel_lse(lse, ref_l) <= 1e-5
    f_out, f_lse = sp_attention(q, k, v, backend="flash_cpu", **kw)
    assert rel(out, f_out) <= 2e-6 and rel_lse(lse, f_lse) <= 2e-6


def test_auto_picks_scores_on_cpu_within_the_limit_only() -> None:
    q = torch.randn(1, 64, 6, 64)
    need = score_bytes(q)
    assert need == 1 * 6 * 64 * 64 * 4 and score_bytes(q.double(), 10) == 6 * 64 * 10 * 8
    assert scores_fit(q, limit=need) and not scores_fit(q, limit=need - 1) and not scores_fit(q, limit=0)
    assert scores_fit(q) == (0 < need <= SCORES_MAX_BYTES)  # the measured default (0: auto never picks it)
    big = 10**6  # keys enough to pass any limit
    assert select_backend(q, need_lse=True, has_mask=True, k_len=big).name == "flash_cpu"
    assert select_backend(q, need_lse=False, has_mask=False, k_len=big).name == "sdpa"
    want = "scores" if scores_fit(q) else "flash_cpu"
    assert select_backend(q, need_lse=True, has_mask=False).name == want
    for lse in (True, False):  # a host whose measured limit covers the call: auto materializes it, else not
        assert select_backend(q, need_lse=lse, has_mask=True, scores_max_bytes=need).name == "scores"
        assert select_backend(q, need_lse=lse, has_mask=True, scores_max_bytes=need - 1).name == (
            "flash_cpu" if lse else "sdpa")
    assert select_backend(q, need_lse=True, has_mask=False, name="scores").name == "scores"  # explicit: always
    with pytest.raises(ValueError, match="'scores' cannot run on device=meta"):
        select_backend(q.to("meta"), need_lse=True, has_mask=False, name="scores")


def ring_worker(rank: int, world: int) -> list[float]:
    from omni_runtime.parallel import state

    state.init_distributed_environment()
    state.initialize_model_parallel(ulysses_degree=1, ring_degree=world)
    try:
        mesh = SPMesh.from_mesh(state.current_mesh())
        assert mesh.strategy == "ring"
        q, k, v, m = inputs(6, n=2 * 23, dead=False)
        jq, jk, jv, _ = inputs(7, n=9, mask=False)
        jm = torch.ones(2, 9, dtype=torch.bool)
        jm[0, 7:] = False
        sl = slice(rank * 23, (rank + 1) * 23)
        kw = dict(joint_q=jq, joint_k=jk, joint_v=jv, joint_strategy="front", joint_key_padding_mask=jm,
                  return_lse=True)
        out, lse = sp_attention(q[:, sl], k[:, sl], v[:, sl], key_padding_mask=m[:, sl], mesh=mesh,
                                backend="scores", **kw)
        f_out, f_lse = sp_attention(q[:, sl], k[:, sl], v[:, sl], key_padding_mask=m[:, sl], mesh=mesh,
                                    backend="flash_cpu", **kw)
        d = {n: kw[n].double() for n in ("joint_q", "joint_k", "joint_v")}
        ref_o, ref_l = sp_attention(q.double(), k.double(), v.double(), key_padding_mask=m, backend="math",
                                    **{**kw, **d})
        mine = torch.cat([ref_o[:, :9], ref_o[:, 9:][:, sl]], 1), torch.cat([ref_l[:, :9], ref_l[:, 9:][:, sl]], 1)
        return [rel(out, mine[0]), rel_lse(lse, mine[1]), rel(out, f_out), rel_lse(lse, f_lse)]
    finally:
        state.destroy_model_parallel()


@pytest.mark.distributed
def test_ring_attention_with_scores_over_gloo() -> None:
    per_rank = run_workers(ring_worker, 2, timeout=120, init_process_group=True)
    for rank, (out_err, lse_err, vs_flash_out, vs_flash_lse) in enumerate(per_rank):
        assert out_err <= 1e-5 and lse_err <= 1e-5, (rank, per_rank)
        assert vs_flash_out <= 2e-6 and vs_flash_lse <= 2e-6, (rank, per_rank)
