"""Parallel attention against a float64 single-process reference.

One process launch per (ulysses, ring) mesh; each worker loops over every case
(lengths 64 / 37 / 1 / uneven per rank, 6 and 5 heads, joint none / front / rear
with 13 text tokens, with and without a key padding mask, fp32 and bf16) and
returns its worst relative errors, for the output and the LSE.
"""

from __future__ import annotations

import math

import pytest
import torch
from rel_error import rel, rel_lse
from spawn import run_workers

from omni_runtime.parallel.attention import Attention, SPMesh, sp_attention
from omni_runtime.parallel.attention.backends import AttentionBackendError, attention_block, select_backend
from omni_runtime.parallel.attention.lse_merge import merge_partial
from omni_runtime.parallel.attention.sp_attention import SPAttentionError

TEXT = 13
HEAD_DIM = 16
BATCH = 2


def shard_sizes(n: int, world: int) -> list[int]:
    """First ranks get ceil(n / world), the last ranks what is left."""
    c = -(-n // world)
    return [max(0, min(c, n - i * c)) for i in range(world)]


def reference(q, k, v, mask, jq, jk, jv, joint):
    """float64 attention over the whole sequence; returns (out, lse) in the output token order."""
    if joint != "none":
        qs = [jq, q] if joint == "front" else [q, jq]
        ks = [jk, k] if joint == "front" else [k, jk]
        vs = [jv, v] if joint == "front" else [v, jv]
        q, k, v = torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)
        if mask is not None:
            ones = mask.new_ones(mask.shape[0], TEXT)
            mask = torch.cat([ones, mask] if joint == "front" else [mask, ones], 1)
    return attention_block(q.double(), k.double(), v.double(), key_mask=mask, return_lse=True, backend="math")


def cases(world: int) -> list[dict]:
    out = []
    lens_options = {"64": [64] * world, "37": [37] * world, "1": [1] * world,
                    "uneven": shard_sizes(10 * world - 3, world)}
    i = 0
    for lname, lens in lens_options.items():
        for heads in (6, 5):
            for joint in ("none", "front", "rear"):
                out.append(dict(lens=lens, lname=lname, heads=heads, joint=joint, mask=(i % 2 == 1),
                                dtype="float32", seed=i))
                i += 1
    # empty shards on the last rank(s): 2 tokens over 2 ranks -> [1, 0]... 5 over 4 -> [2, 2, 1, 0]
    zero = shard_sizes(max(1, 2 * world - 3), world)
    for j, (joint, mask) in enumerate([("front", True), ("none", False)]):
        out.append(dict(lens=zero, lname="zero", heads=5, joint=joint, mask=mask, dtype="float32", seed=50 + j))
    # batch 1 has no visible key at all: out 0 and lse -inf on every rank, not NaN and not a stale block
    out.append(dict(lens=lens_options["uneven"], lname="dead", heads=5, joint="none", mask=True, dead=True,
                    dtype="float32", seed=60))
    for j, (lname, heads, joint) in enumerate([("64", 6, "front"), ("37", 5, "rear"), ("uneven", 5, "none")]):
        out.append(dict(lens=lens_options[lname], lname=lname, heads=heads, joint=joint, mask=(j != 1),
                        dtype="bfloat16", seed=100 + j))
    return out


def run_case(case: dict, rank: int, world: int, convert_to_fp32: bool | None = None,
             mesh: SPMesh | None = None) -> dict:
    dtype = getattr(torch, case["dtype"])
    lens, heads = case["lens"], case["heads"]
    n = sum(lens)
    g = torch.Generator().manual_seed(case["seed"])
    q, k, v = (torch.randn(BATCH, n, heads, HEAD_DIM, generator=g).to(dtype) for _ in range(3))
    jq, jk, jv = (torch.randn(BATCH, TEXT, heads, HEAD_DIM, generator=g).to(dtype) for _ in range(3))
    mask = None
    if case["mask"]:
        mask = torch.rand(BATCH, n, generator=g) > 0.3
        mask[:, 0] = True
        if case.get("dead"):
            mask[1] = False
    joint = case["joint"]
    ref_out, ref_lse = reference(q, k, v, mask, jq, jk, jv, joint)

    start = sum(lens[:rank])
    sl = slice(start, start + lens[rank])
    kw = {}
    if joint != "none":
        kw = dict(joint_q=jq, joint_k=jk, joint_v=jv, joint_strategy=joint)
    kw["mesh"] = mesh
    out, lse = sp_attention(q[:, sl], k[:, sl], v[:, sl], key_padding_mask=None if mask is None else mask[:, sl],
                            return_lse=True, convert_to_fp32=convert_to_fp32, **kw)
    assert lse.dtype == torch.float32, lse.dtype
    assert out.dtype == dtype, out.dtype
    if joint == "none":
        ref_o, ref_l = ref_out[:, sl], ref_lse[:, sl]
    elif joint == "front":
        ref_o = torch.cat([ref_out[:, :TEXT], ref_out[:, TEXT + start:TEXT + start + lens[rank]]], 1)
        ref_l = torch.cat([ref_lse[:, :TEXT], ref_lse[:, TEXT + start:TEXT + start + lens[rank]]], 1)
    else:
        ref_o = torch.cat([ref_out[:, start:start + lens[rank]], ref_out[:, n:]], 1)
        ref_l = torch.cat([ref_lse[:, start:start + lens[rank]], ref_lse[:, n:]], 1)
    assert out.shape == ref_o.shape, (out.shape, ref_o.shape)
    # the plain (no-lse) path must agree with the lse path
    plain = sp_attention(q[:, sl], k[:, sl], v[:, sl], key_padding_mask=None if mask is None else mask[:, sl], **kw)
    return {"out": rel(out, ref_o) if ref_o.numel() else 0.0, "lse": rel_lse(lse, ref_l) if ref_l.numel() else 0.0,
            "plain": rel(plain, ref_o) if ref_o.numel() else 0.0,
            "text": out[:, :TEXT].double().sum().item() if joint == "front" else 0.0,
            "checksum": out.double().sum().item()}


def mesh_worker(rank: int, world: int, ulysses: int, ring: int) -> list[dict]:
    from omni_runtime.parallel import state

    state.init_distributed_environment()
    state.initialize_model_parallel(ulysses_degree=ulysses, ring_degree=ring)
    try:
        expected = {(2, 1): "ulysses", (4, 1): "ulysses", (1, 2): "ring", (1, 4): "ring", (2, 2): "hybrid"}
        mesh = state.current_mesh()
        sp_mesh = SPMesh.from_mesh(mesh)
        assert sp_mesh.strategy == expected[(ulysses, ring)], sp_mesh
        assert Attention().strategy == "none"  # nothing is read from globals: local until a mesh is bound
        bound = Attention()
        bound.bind_mesh(sp_mesh)
        assert bound.strategy == expected[(ulysses, ring)]
        mesh.reset_comm_stats()
        results = []
        for case in cases(world):
            r = run_case(case, rank, world, mesh=sp_mesh)
            r.update(lname=case["lname"], heads=case["heads"], joint=case["joint"], mask=case["mask"],
                     dtype=case["dtype"])
            results.append(r)
        # a layer marked local ignores the mesh: full inputs on every rank give the full result
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, 11, 2, 8, generator=g) for _ in range(3))
        local = Attention(sequence_parallel=False)
        local.bind_mesh(sp_mesh)
        assert local.strategy == "none"
        assert rel(local(q, k, v), reference(q, k, v, None, None, None, None, "none")[0]) <= 1e-6
        stats = mesh.comm_stats()
        assert stats.bytes_sent > 0  # the strategy really communicated, through the groups' communicators
        assert (stats.calls.get("all_to_all", 0) > 0) == (ulysses > 1), stats
        assert (stats.calls.get("p2p_send", 0) > 0) == (ring > 1), stats
        if ring > 1:
            # convert_to_fp32=False merges the ring blocks in bf16: still close, but not the same numbers
            case = dict(lens=[64] * world, lname="64", heads=6, joint="front", mask=True, dtype="bfloat16", seed=7)
            r32, r16 = run_case(case, rank, world, True, sp_mesh), run_case(case, rank, world, False, sp_mesh)
            results.append(dict(r16, lname="64", heads=6, joint="none", mask=True, dtype="bf16-acc",
                                fp32_acc_out=r32["out"], differs=r32["checksum"] != r16["checksum"]))
        return results
    finally:
        state.destroy_model_parallel()


def check_results(per_rank: list[list[dict]], label: str) -> None:
    for rank, results in enumerate(per_rank):
        for r in results:
            if r["dtype"] == "bf16-acc":
                assert r["differs"] and r["fp32_acc_out"] <= 1e-2 and r["out"] <= 3e-2, r
                continue
            tol = 1e-5 if r["dtype"] == "float32" else 1e-2
            what = f"{label} rank {rank} {r}"
            assert r["out"] <= tol, what
            assert r["plain"] <= tol, what
            assert r["lse"] <= tol, what
    # text part (front) is the same on every rank up to rounding
    for i, r0 in enumerate(per_rank[0]):
        if r0["joint"] == "front" and r0["dtype"] != "bf16-acc":
            for results in per_rank[1:]:
                assert math.isclose(results[i]["text"], r0["text"], rel_tol=1e-4, abs_tol=1e-2), label


def test_no_mesh_matches_reference() -> None:
    """(ulysses, ring) = (1, 1): no mesh, plain local attention, all cases in-process."""
    results = []
    for case in cases(1):
        r = run_case(case, 0, 1)
        r.update(joint=case["joint"], dtype=case["dtype"])
        results.append(r)
    check_results([results], "1x1")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2), (4, 1), (1, 4), (2, 2)])
def test_sp_attention_matches_reference(ulysses: int, ring: int) -> None:
    world = ulysses * ring
    per_rank = run_workers(mesh_worker, world, args=(ulysses, ring), timeout=120, init_process_group=True)
    assert len(per_rank[0]) == len(cases(world)) + (ring > 1)
    check_results(per_rank, f"ulysses {ulysses} ring {ring}")
    worst = {key: max(r[key] for res in per_rank for r in res if r["dtype"] == "float32") for key in ("out", "lse")}
    bf16 = [r for r in per_rank[0] if r["dtype"] == "bf16-acc"]
    if bf16:
        print(f"  bf16 ring merge: fp32 accumulation {bf16[0]['fp32_acc_out']:.2e}, bf16 {bf16[0]['out']:.2e}")
    print(f"ulysses {ulysses} ring {ring}: worst fp32 rel err {worst}")


# ---------------------------------------------------------------- single-process pieces
def test_backends_agree_with_float64_math_and_report_lse() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 3, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 11, 3, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 11, 3, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 11, generator=g) > 0.4
    mask[1] = False  # batch 1: every key masked -> out 0, lse -inf
    ref, ref_lse = attention_block(q, k, v, key_mask=mask, return_lse=True, backend="math")
    # explicit softmax for batch 0
    s = torch.einsum("bqhd,bkhd->bhqk", q, k)[0] / math.sqrt(8)
    s = s.masked_fill(~mask[0], float("-inf"))
    assert torch.allclose(ref_lse[0], torch.logsumexp(s, -1).transpose(0, 1), atol=1e-12)
    assert torch.equal(ref[1], torch.zeros_like(ref[1]))
    assert torch.isneginf(ref_lse[1]).all()
    for name in ("flash_cpu", "math"):
        out, lse = attention_block(q.float(), k.float(), v.float(), key_mask=mask, return_lse=True, backend=name)
        assert rel(out, ref) <= 1e-6, name
        assert torch.allclose(lse[0].double(), ref_lse[0], atol=1e-5), name
        assert torch.isneginf(lse[1]).all(), name
    out = attention_block(q.float(), k.float(), v.float(), key_mask=mask, backend="sdpa")
    assert rel(out, ref) <= 1e-6
    with pytest.raises(AttentionBackendError, match="sdpa"):
        attention_block(q, k, v, return_lse=True, backend="sdpa")
    with pytest.raises(AttentionBackendError, match="unknown"):
        attention_block(q, k, v, backend="nope")


def test_empty_blocks_do_not_crash_the_cpu_kernel() -> None:
    q = torch.randn(1, 0, 2, 4)
    k = torch.randn(1, 5, 2, 4)
    out, lse = attention_block(q, k, k, return_lse=True, backend="flash_cpu")
    assert out.shape == (1, 0, 2, 4) and lse.shape == (1, 0, 2)
    out, lse = attention_block(k, q, q, return_lse=True, backend="flash_cpu")
    assert torch.equal(out, torch.zeros(1, 5, 2, 4)) and torch.isneginf(lse).all()


def test_lse_merge_equals_attention_over_the_union_and_ignores_empty_blocks() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 12, 3, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 12, 3, 8, generator=g, dtype=torch.float64)
    ref, ref_lse = attention_block(q, k, v, return_lse=True, backend="math")
    out = lse = None
    empty = torch.zeros(2, 4, dtype=torch.bool)
    # an all-masked block first: must not poison the merge with NaN
    bo, bl = attention_block(q, k[:, :4], v[:, :4], key_mask=empty, return_lse=True, backend="math")
    out, lse = merge_partial(out, lse, bo, bl, acc_dtype=torch.float64)
    for sl in (slice(0, 4), slice(4, 9), slice(9, 12)):
        bo, bl = attention_block(q, k[:, sl], v[:, sl], return_lse=True, backend="flash_cpu")
        out, lse = merge_partial(out, lse, bo, bl, acc_dtype=torch.float64)
    assert rel(out, ref) < 1e-12 and rel(lse, ref_lse) < 1e-12
    assert not torch.isnan(out).any()


def test_backend_selection() -> None:
    q = torch.randn(1, 2, 1, 4)
    assert select_backend(q, need_lse=True, has_mask=True).name == "flash_cpu"
    assert select_backend(q, need_lse=False, has_mask=False).name == "sdpa"
    assert select_backend(q.double(), need_lse=True, has_mask=False).name == "flash_cpu"


def test_attention_module_without_mesh_and_argument_errors() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 9, 2, 8, generator=g) for _ in range(3))
    jq, jk, jv = (torch.randn(1, TEXT, 2, 8, generator=g) for _ in range(3))
    attn = Attention()
    out = attn(q, k, v, joint_q=jq, joint_k=jk, joint_v=jv, joint_strategy="rear")
    ref, _ = reference(q, k, v, None, jq, jk, jv, "rear")
    assert rel(out, ref) <= 1e-6
    with pytest.raises(SPAttentionError, match="joint_strategy='middle'"):
        sp_attention(q, k, v, joint_strategy="middle")
    with pytest.raises(SPAttentionError, match="needs joint_q"):
        sp_attention(q, k, v, joint_strategy="front")
    with pytest.raises(SPAttentionError, match="key_padding_mask"):
        sp_attention(q, k, v, key_padding_mask=torch.ones(1, 9))


def test_auto_pad_mask_reaches_sharded_layers_only() -> None:
    """An auto_pad mask recorded by the sp_plan hooks covers the image shard; a layer kept local
    (text-only attention, say) must neither apply it nor refuse a sequence of another length;
    a sharded layer applies it, combined with a mask the caller passes."""
    from omni_runtime.parallel.attention.sp_context import SPForwardContext, sp_forward_context

    g = torch.Generator().manual_seed(4)
    ctx = SPForwardContext(key_padding_mask=torch.tensor([True, True, False, False]))
    local, sharded = Attention(sequence_parallel=False), Attention()
    for n in (4, 7):
        q, k, v = (torch.randn(1, n, 2, 8, generator=g) for _ in range(3))
        ref = reference(q, k, v, None, None, None, None, "none")[0]
        with sp_forward_context(ctx):
            assert rel(local(q, k, v), ref) <= 1e-6, n
    # the model's own (sharded) attention does honour it, single process included
    q, k, v = (torch.randn(1, 4, 2, 8, generator=g) for _ in range(3))
    with sp_forward_context(ctx):
        out = sharded(q, k, v)
    assert rel(out, reference(q, k, v, ctx.key_padding_mask[None], None, None, None, "none")[0]) <= 1e-6
    # a mask of the caller's own is combined with it: the pad stays masked
    own = torch.tensor([[False, True, True, True]])
    with sp_forward_context(ctx):
        out = sharded(q, k, v, key_padding_mask=own)
    assert rel(out, reference(q, k, v, own & ctx.key_padding_mask, None, None, None, "none")[0]) <= 1e-6
