"""SP plans: a toy dual-stream model with ``_sp_plan`` gives its unsharded output under SP 2 and SP 4
(lengths divisible or not, with and without auto_pad), plan validation, sharding helpers."""

from __future__ import annotations

import pytest
import torch
from spawn import run_workers
from torch import nn

from omni_runtime.parallel.attention import Attention
from omni_runtime.parallel.sp_plan import (
    SequenceParallelInput,
    SequenceParallelOutput,
    SequenceParallelPartialInput,
    SPPlanError,
    resolve_module_path,
    validate_sp_plan,
)
from omni_runtime.parallel.sp_sharding import ShardingError, ShardingValidator, shard_sizes

DIM, HEADS, HEAD_DIM, TEXT = 24, 3, 8, 5


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


class ToyRope(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv", 1.0 / (10.0 ** (torch.arange(HEAD_DIM // 2) / (HEAD_DIM // 2))))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = ids.float() * self.inv[None, :]
        f = torch.cat([f, f], dim=-1)
        return torch.cos(f), torch.sin(f)


class ToyDualBlock(nn.Module):
    """Image and text streams with their own weights, one joint attention (text in front)."""

    def __init__(self) -> None:
        super().__init__()
        self.img_qkv = nn.Linear(DIM, 3 * DIM)
        self.txt_qkv = nn.Linear(DIM, 3 * DIM)
        self.img_out = nn.Linear(DIM, DIM)
        self.txt_out = nn.Linear(DIM, DIM)
        self.img_mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.attn = Attention()

    def forward(self, hidden_states, encoder_hidden_states, rope):
        cos, sin = rope
        b, n, _ = hidden_states.shape
        t = encoder_hidden_states.shape[1]
        q, k, v = self.img_qkv(hidden_states).view(b, n, 3, HEADS, HEAD_DIM).unbind(2)
        jq, jk, jv = self.txt_qkv(encoder_hidden_states).view(b, t, 3, HEADS, HEAD_DIM).unbind(2)
        q, k = rotate(q, cos[t:], sin[t:]), rotate(k, cos[t:], sin[t:])
        jq, jk = rotate(jq, cos[:t], sin[:t]), rotate(jk, cos[:t], sin[:t])
        out = self.attn(q, k, v, jq, jk, jv, joint_strategy="front")
        txt, img = out[:, :t].reshape(b, t, DIM), out[:, t:].reshape(b, n, DIM)
        hidden_states = hidden_states + self.img_out(img)
        hidden_states = hidden_states + self.img_mlp(hidden_states)
        return hidden_states, encoder_hidden_states + self.txt_out(txt)


PLAN = {
    "": {"hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3)},
    "rope": {0: SequenceParallelPartialInput(split_dim=0, text_len_source="txt_ids", expected_dims=2,
                                             split_output=True),
             1: SequenceParallelPartialInput(split_dim=0, text_len_source="txt_ids", expected_dims=2,
                                             split_output=True)},
    "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
}


class ToyDualStreamModel(nn.Module):
    _sp_plan = PLAN

    def __init__(self) -> None:
        super().__init__()
        self.x_embed = nn.Linear(4, DIM)
        self.c_embed = nn.Linear(6, DIM)
        self.rope = ToyRope()
        self.blocks = nn.ModuleList([ToyDualBlock() for _ in range(2)])
        self.norm = nn.LayerNorm(DIM)
        self.proj_out = nn.Linear(DIM, 4)

    def forward(self, hidden_states, encoder_hidden_states, txt_ids, img_ids):
        rope = self.rope(torch.cat([txt_ids, img_ids], dim=0))
        h, e = self.x_embed(hidden_states), self.c_embed(encoder_hidden_states)
        for block in self.blocks:
            h, e = block(h, e, rope)
        return self.proj_out(self.norm(h))


def make_inputs(n: int):
    g = torch.Generator().manual_seed(n)
    return (torch.randn(2, n, 4, generator=g), torch.randn(2, TEXT, 6, generator=g),
            torch.arange(TEXT, dtype=torch.float32)[:, None], 100.0 + torch.arange(n, dtype=torch.float32)[:, None])


def make_model() -> ToyDualStreamModel:
    torch.manual_seed(0)
    return ToyDualStreamModel().eval()


LENGTHS = (16, 13)


def plan_worker(rank: int, world: int, ulysses: int, ring: int) -> dict:
    from omni_runtime.parallel import state
    from omni_runtime.parallel.sp_hooks import apply_sequence_parallel, remove_sequence_parallel
    from omni_runtime.parallel.sp_sharding import sp_gather, sp_shard, sp_shard_with_padding
    from omni_runtime.parallel.strategies import SequenceParallel

    state.init_distributed_environment()
    state.initialize_model_parallel(ulysses_degree=ulysses, ring_degree=ring)
    try:
        res: dict = {}
        mesh = state.current_mesh()
        sp_group = mesh.group("sp")
        model = make_model()
        strategy = SequenceParallel(mesh)
        strategy.apply(model)
        res["bound"] = sorted({m.strategy for m in model.modules() if isinstance(m, Attention)})
        mesh.reset_comm_stats()
        with torch.no_grad():
            for n in LENGTHS:
                res[f"plain{n}"] = model(*make_inputs(n)).tolist()
        # the hooks recorded the shard layout, so attention never had to exchange lengths: the only gathers on
        # the sp group are the output gather's (its shapes, then its data), two per forward
        res["sp_calls"] = dict(sp_group.device_communicator.stats.calls)
        res["mesh_calls"] = dict(mesh.comm_stats().calls)
        strategy.remove(model)
        res["unbound"] = sorted({m.strategy for m in model.modules() if isinstance(m, Attention)})
        padded = dict(PLAN, **{"": {"hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3,
                                                                           auto_pad=True)}})
        strategy = SequenceParallel(mesh, plan=padded)
        strategy.apply(model)
        with torch.no_grad():
            for n in LENGTHS:
                res[f"autopad{n}"] = model(*make_inputs(n)).tolist()
        strategy.remove(model)

        # a plan that shards but never gathers is caught at the end of the forward
        no_gather = {k: v for k, v in PLAN.items() if k != "proj_out"}
        apply_sequence_parallel(model, sp_group, no_gather)
        try:
            with torch.no_grad():
                model(*make_inputs(16))
            res["missing_gather"] = "not caught"
        except ShardingError as e:
            res["missing_gather"] = str(e)
        remove_sequence_parallel(model)

        # sharding helpers: uneven shards round-trip exactly, padding is reported
        sp = state.get_sp_group()  # the reference facade's sp group of the current mesh
        x = torch.arange(2 * 11 * 3, dtype=torch.float32).view(2, 11, 3)
        shard = sp_shard(x, 1, validate=False, group=sp)
        res["shard_len"] = shard.shape[1]
        res["roundtrip"] = bool(torch.equal(sp_gather(shard, 1, group=sp), x))
        sh, pad = sp_shard_with_padding(x, 1, group=sp)
        full = sp_gather(sh, 1, group=sp)
        res["pad"] = pad
        res["pad_roundtrip"] = bool(torch.equal(full[:, :11], x)) and bool((full[:, 11:] == 0).all())
        try:
            sp_shard(x, 1, group=sp)
            res["indivisible"] = "not raised"
        except ShardingError as e:
            res["indivisible"] = str(e)
        v = ShardingValidator()
        with v.track():
            a = v.shard(x, "a", 1, validate_divisible=False, group=sp)
            v.shard(x, "b", 1, validate_divisible=False, group=sp)
            v.gather(a, "a", 1, group=sp)
        try:
            v.validate()
            res["validator"] = "not raised"
        except ShardingError as e:
            res["validator"] = str(e)
        return res
    finally:
        state.destroy_model_parallel()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ulysses,ring", [(1, 2), (2, 2)])
def test_toy_dual_stream_model_matches_unsharded(ulysses: int, ring: int) -> None:
    world = ulysses * ring
    model = make_model()
    with torch.no_grad():
        refs = {n: model(*make_inputs(n)) for n in LENGTHS}
    per_rank = run_workers(plan_worker, world, args=(ulysses, ring), timeout=120, init_process_group=True)
    for rank, res in enumerate(per_rank):
        for n, ref in refs.items():
            for kind in ("plain", "autopad"):
                got = torch.tensor(res[f"{kind}{n}"])
                assert got.shape == ref.shape, (rank, kind, n, got.shape)
                err = float((got - ref).norm() / ref.norm())
                assert err <= 1e-5, (rank, kind, n, err)
        assert "sharded but never gathered: ['sequence']" in res["missing_gather"]
        assert res["bound"] == [{(1, 2): "ring", (2, 2): "hybrid"}[(ulysses, ring)]]
        assert res["unbound"] == ["none"]
        assert res["sp_calls"]["all_gather"] == 2 * len(LENGTHS), res["sp_calls"]
        calls = res["mesh_calls"]
        assert (calls.get("all_to_all", 0) > 0) == (ulysses > 1) and calls.get("p2p_send", 0) > 0, calls
        assert res["shard_len"] == shard_sizes(11, world)[rank]
        assert res["roundtrip"] and res["pad_roundtrip"]
        assert res["pad"] == (-11) % world
        assert "not divisible by the sequence parallel size" in res["indivisible"]
        assert "sharded but never gathered: ['b']" in res["validator"]


def test_shard_sizes_rule() -> None:
    assert shard_sizes(10, 4) == [3, 3, 3, 1]
    assert shard_sizes(5, 4) == [2, 2, 1, 0]
    assert shard_sizes(8, 4) == [2, 2, 2, 2]
    assert shard_sizes(1, 2) == [1, 0]


def test_wildcard_paths_resolve() -> None:
    model = make_model()
    assert [p for p, _ in resolve_module_path(model, "blocks.*")] == ["blocks.0", "blocks.1"]
    assert [p for p, _ in resolve_module_path(model, "blocks.*.attn")] == ["blocks.0.attn", "blocks.1.attn"]
    assert resolve_module_path(model, "")[0][1] is model
    validate_sp_plan(PLAN, model)
    validate_sp_plan({"blocks.*": {"hidden_states": SequenceParallelInput(1, 3)}}, model)


@pytest.mark.parametrize("plan,message", [
    ({1: {"x": SequenceParallelInput(1)}}, "key 1 must be a str module path"),
    ({"": "split please"}, "must be a dict of input plans, a SequenceParallelOutput"),
    ({"": {"hidden_states": SequenceParallelInput(split_dim=1, expected_dims=0)}}, "expected_dims = 0 must be a positive"),
    ({"": {"hidden_states": SequenceParallelInput(split_dim=3, expected_dims=3)}},
     r"split_dim = 3 is out of range for expected_dims=3; allowed -3..2"),
    ({"proj_out": SequenceParallelOutput(gather_dim=-4, expected_dims=3)}, "gather_dim = -4 is out of range"),
    ({"rope": {"ids": SequenceParallelInput(split_dim=0, split_output=True)}},
     "split_output=True, so its key must be the output index"),
    ({"": {"hidden_states": SequenceParallelOutput(gather_dim=1)}}, "SequenceParallelOutput inside an input dict"),
    ({"layers.*": {"hidden_states": SequenceParallelInput(1)}}, "'layers.\\*' matches no submodule"),
    ({"": {"hidden_state": SequenceParallelInput(1)}}, "no argument 'hidden_state'"),
    ({"rope": {0: SequenceParallelPartialInput(0, text_len_source=-3, split_output=True)}},
     "text_len_source = -3 must be >= 0"),
    ({"rope": {0: SequenceParallelPartialInput(0, text_len_source="text_len", split_output=True)}},
     "text_len_source = 'text_len' is not a forward argument"),
    ({"rope": {0: SequenceParallelPartialInput(0, text_len_source=2.5, split_output=True)}},
     "must be an int >= 0 or a forward-argument name"),
])
def test_validate_sp_plan_rejects_bad_plans(plan: dict, message: str) -> None:
    with pytest.raises(SPPlanError, match=message):
        validate_sp_plan(plan, make_model())


def test_sharding_validator_and_the_group_it_needs() -> None:
    from omni_runtime.parallel.group_coordinator import GroupCoordinator

    v, solo = ShardingValidator(), GroupCoordinator.single()
    x = torch.arange(6.0).view(1, 6)
    with v.track():
        v.gather(v.shard(x, "h", 1, group=solo), "h", 1, group=solo)  # one process: identity, but recorded
        v.validate()
        v.shard(x, "e", 1, group=solo)
        with pytest.raises(ShardingError, match=r"sharded but never gathered: \['e'\]"):
            v.validate()
    with pytest.raises(ShardingError, match=r"group is required: the SP GroupCoordinator"):
        v.shard(x, "f", 1)
