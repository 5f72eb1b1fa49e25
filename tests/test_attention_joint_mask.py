"""``joint_key_padding_mask``: padded text tokens are no key in sp_attention, in every strategy.

(a) In one process: rows whose texts have different lengths, padded to the longest and masked, give for every row
what attention over that row's unpadded text gives (float64, also with an image key mask and "rear" text).
(b) Real gloo processes (Ulysses 2, Ring 2, Ulysses 2 x Ring 2) over an image sequence the degree does not divide:
every rank's shard of the output and LSE equals the single-process result (float64).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from spawn import run_workers

from omni_runtime.parallel.attention import Attention, SPMesh, sp_attention
from omni_runtime.parallel.attention.backends import attention_block
from omni_runtime.parallel.attention.sp_attention import SPAttentionError

HEADS, HEAD_DIM = 5, 8
TEXT_LENS = (7, 3, 11)  # one row per text length; 11 = the padded length (one row has no padding)
IMAGE = 37  # divided by neither 2 nor 4


def _inputs(seed: int, image: int = IMAGE, image_mask: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, t = len(TEXT_LENS), max(TEXT_LENS)
    q, k, v = (torch.randn(b, image, HEADS, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(3))
    jq, jk, jv = (torch.randn(b, t, HEADS, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(3))
    jmask = torch.arange(t)[None, :] < torch.tensor(TEXT_LENS)[:, None]
    # the padding's values must not matter: make them large, a leak would show
    for x in (jk, jv):
        x.masked_fill_(~jmask[:, :, None, None], 1e3)
    kmask = None
    if image_mask:
        kmask = torch.rand(b, image, generator=g) > 0.3
        kmask[:, 0] = True
    return dict(q=q, k=k, v=v, jq=jq, jk=jk, jv=jv, jmask=jmask, kmask=kmask)


def _row_reference(x: dict, row: int, joint: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 attention of one row over its unpadded text and its image: (out, lse) in output token order."""
    n = TEXT_LENS[row]
    parts = {name: x[name][row:row + 1] for name in ("q", "k", "v")}
    text = {name: x["j" + name][row:row + 1, :n] for name in ("q", "k", "v")}
    order = (lambda t, i: [t, i]) if joint == "front" else (lambda t, i: [i, t])
    q, k, v = (torch.cat(order(text[c], parts[c]), dim=1) for c in ("q", "k", "v"))
    mask = None
    if x["kmask"] is not None:
        m = x["kmask"][row:row + 1]
        mask = torch.cat(order(m.new_ones(1, n), m), dim=1)
    return attention_block(q, k, v, key_mask=mask, return_lse=True, backend="math")


def _unpad_row(out: torch.Tensor, row: int, joint: str, image: int) -> torch.Tensor:
    """A row of sp_attention's output with the padded text tokens' outputs dropped."""
    t, n = max(TEXT_LENS), TEXT_LENS[row]
    o = out[row:row + 1]
    if joint == "front":
        return torch.cat([o[:, :n], o[:, t:]], dim=1)
    return torch.cat([o[:, :image], o[:, image:image + n]], dim=1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("joint,image_mask", [("front", False), ("front", True), ("rear", False), ("rear", True)])
def test_local_masked_padding_equals_unpadded_text(joint: str, image_mask: bool) -> None:
    x = _inputs(seed=1 if image_mask else 0, image_mask=image_mask)
    out, lse = sp_attention(x["q"], x["k"], x["v"], joint_q=x["jq"], joint_k=x["jk"], joint_v=x["jv"],
                            joint_strategy=joint, key_padding_mask=x["kmask"], joint_key_padding_mask=x["jmask"],
                            return_lse=True)
    layer = Attention()(x["q"], x["k"], x["v"], x["jq"], x["jk"], x["jv"], joint, x["kmask"], x["jmask"])
    assert torch.equal(layer, out)  # the module passes the mask through
    worst = 0.0
    for row in range(len(TEXT_LENS)):
        ref_out, ref_lse = _row_reference(x, row, joint)
        got_out, got_lse = _unpad_row(out, row, joint, IMAGE), _unpad_row(lse, row, joint, IMAGE)
        worst = max(worst, _rel(got_out, ref_out), _rel(got_lse, ref_lse))
    assert worst <= 1e-12, worst
    # without the mask the padding leaks (the test can see a leak)
    unmasked = sp_attention(x["q"], x["k"], x["v"], joint_q=x["jq"], joint_k=x["jk"], joint_v=x["jv"],
                            joint_strategy=joint, key_padding_mask=x["kmask"])
    assert _rel(_unpad_row(unmasked, 0, joint, IMAGE), _row_reference(x, 0, joint)[0]) > 1e-3


def test_all_text_masked_leaves_image_only_attention() -> None:
    """A row whose text is all padding: its image queries see only image keys (no NaN)."""
    x = _inputs(seed=2)
    jmask = torch.zeros_like(x["jmask"])
    out = sp_attention(x["q"], x["k"], x["v"], joint_q=x["jq"], joint_k=x["jk"], joint_v=x["jv"],
                       joint_strategy="front", joint_key_padding_mask=jmask)
    ref = attention_block(x["q"], x["k"], x["v"], backend="math")
    assert not bool(torch.isnan(out).any())
    assert _rel(out[:, max(TEXT_LENS):], ref) <= 1e-12


def test_joint_mask_argument_errors() -> None:
    x = _inputs(seed=3, image=4)
    base = dict(joint_q=x["jq"], joint_k=x["jk"], joint_v=x["jv"], joint_strategy="front")
    with pytest.raises(SPAttentionError, match=r"joint_key_padding_mask must be bool \(batch, text_seq\)=\(3, 11\)"):
        sp_attention(x["q"], x["k"], x["v"], **base, joint_key_padding_mask=x["jmask"].long())
    with pytest.raises(SPAttentionError, match=r"joint_key_padding_mask must be bool .* got torch.bool \(3, 10\)"):
        sp_attention(x["q"], x["k"], x["v"], **base, joint_key_padding_mask=x["jmask"][:, :10])
    with pytest.raises(SPAttentionError, match="joint_key_padding_mask was given with joint_strategy='none'"):
        sp_attention(x["q"], x["k"], x["v"], joint_key_padding_mask=x["jmask"])


# ---------------------------------------------------------------- real processes

CASES = [("front", False), ("front", True), ("rear", True)]


def _shards(n: int, world: int) -> list[int]:
    c = -(-n // world)
    return [max(0, min(c, n - i * c)) for i in range(world)]


def _case_outputs(x: dict, joint: str, sl: slice | None = None, mesh: SPMesh | None = None) -> tuple:
    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if (t is None or sl is None) else t[:, sl]

    return sp_attention(cut(x["q"]), cut(x["k"]), cut(x["v"]), joint_q=x["jq"], joint_k=x["jk"], joint_v=x["jv"],
                        joint_strategy=joint, key_padding_mask=cut(x["kmask"]), joint_key_padding_mask=x["jmask"],
                        return_lse=True, mesh=mesh)


def _local_part(full: torch.Tensor, joint: str, start: int, length: int) -> torch.Tensor:
    """The rows of a single-process output one rank returns: all text, then its image tokens (or the reverse)."""
    t = max(TEXT_LENS)
    if joint == "front":
        return torch.cat([full[:, :t], full[:, t + start:t + start + length]], dim=1)
    return torch.cat([full[:, start:start + length], full[:, IMAGE:]], dim=1)


def _mesh_worker(rank: int, world: int, ulysses: int, ring: int) -> list[float]:
    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec

    mesh = Mesh.build(ParallelSpec(ulysses=ulysses, ring=ring), rank,
                      f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", "cpu")
    try:
        sp = SPMesh.from_mesh(mesh)
        lens = _shards(IMAGE, world)
        start = sum(lens[:rank])
        errors = []
        for i, (joint, image_mask) in enumerate(CASES):
            x = _inputs(seed=10 + i, image_mask=image_mask)
            ref_out, ref_lse = _case_outputs(x, joint)  # the single-process result, computed here too
            out, lse = _case_outputs(x, joint, slice(start, start + lens[rank]), sp)
            want_out = _local_part(ref_out, joint, start, lens[rank])
            want_lse = _local_part(ref_lse, joint, start, lens[rank])
            assert out.shape == want_out.shape, (out.shape, want_out.shape)
            errors.append(max(_rel(out, want_out), _rel(lse, want_lse)))
        return errors
    finally:
        mesh.destroy()


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2), (2, 2)])
def test_sharded_joint_mask_equals_single_process(ulysses: int, ring: int) -> None:
    per_rank = run_workers(_mesh_worker, ulysses * ring, args=(ulysses, ring), timeout=120)
    worst = max(e for errs in per_rank for e in errs)
    assert all(len(errs) == len(CASES) for errs in per_rank)
    assert math.isfinite(worst) and worst <= 1e-12, per_rank
    print(f"ulysses {ulysses} ring {ring}: worst float64 rel err {worst:.2e}")
