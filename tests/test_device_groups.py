"""Every tensor on a group whose backend takes its device: the mesh, the rank fan-out and a stage's start-up run
on a device backend that refuses CPU tensors as NCCL does (issue 28).

No GPU here, so each worker registers ``fake_nccl``: a gloo process group registered for the ``cuda`` device type
only (``Backend.register_backend(..., devices=["cuda"])``). torch dispatches a collective by the tensor's device,
so a CPU tensor on it fails exactly as on NCCL ("No backend type associated with device type cpu"). The mesh is
built through the product's path (``Mesh.build(..., device_backend=)``, ``WorkerSpec.device_backend`` for a stage
rank), i.e. the default world group and every device group get it where CUDA would get nccl. The ranks compute on
CPU, so every tensor they exchange must go over the gloo groups: a metadata tensor, a barrier or the fan-out's
handle that reaches a device group or an NCCL-only default group fails the test.

Against the code before the fix (default group initialized with the device backend alone, the fan-out built over
it, the start-up barrier on it, HSDP on the device groups) the first three fail with that error; the EP test guards
the all2all exchange, which already routed by device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spawn import run_workers

pytestmark = pytest.mark.distributed

FAKE = "fake_nccl"
REFUSAL = "No backend type associated with device type cpu"


def _register_fake_nccl() -> None:
    """Register ``fake_nccl`` in this process: gloo underneath, but the ``cuda`` device type only."""
    import torch.distributed as dist

    if FAKE in dist.Backend.backend_list:
        return

    def create(store, rank, size, timeout):
        return dist.ProcessGroupGloo(store, rank, size, timeout)

    dist.Backend.register_backend(FAKE, create, devices=["cuda"])


def _refuses_cpu(group) -> str:
    import torch.distributed as dist

    try:
        dist.all_reduce(torch.zeros(1), group=group)
    except RuntimeError as e:
        return str(e)
    return "accepted a CPU tensor"


def _build_mesh(rank: int, store: str, **degrees):
    from omni_runtime.parallel.mesh import Mesh
    from omni_runtime.parallel.parallel_spec import ParallelSpec

    _register_fake_nccl()
    return Mesh.build(ParallelSpec(**degrees), rank, f"file://{store}", "cpu", device_backend=FAKE)


def _mesh_worker(rank: int, world: int, store: str) -> dict:
    import torch.distributed as dist

    from omni_runtime.comm.shm_broadcast import MessageQueue
    from omni_runtime.parallel.attention.sp_attention import SPMesh, sp_attention
    from omni_runtime.parallel.group_coordinator import in_the_same_node_as
    from omni_runtime.parallel.sp_sharding import sp_gather

    mesh = _build_mesh(rank, store, ulysses=2)
    try:
        g = mesh.group("ulysses")
        out: dict = {"device_group_refuses_cpu": _refuses_cpu(g.device_group), "backend": g.backend}
        ones = torch.ones(1)
        dist.all_reduce(ones)  # the default group takes a CPU tensor (over its gloo half)
        dist.barrier()
        out["default_group_sum"] = float(ones)
        out["object"] = g.broadcast_object({"step": 3} if rank == 0 else None)
        d = g.broadcast_tensor_dict({"x": torch.arange(4.0), "n": 7} if rank == 0 else None)
        out["tensor_dict"] = [d["x"].tolist(), d["n"]]
        if rank == 0:  # the pp path: metadata by send_object, tensors after it
            g.send_tensor_dict({"h": torch.full((2, 3), 5.0), "tag": "a"}, dst=1)
        else:
            r = g.recv_tensor_dict(src=0)
            out["p2p"] = [r["h"].sum().item(), r["tag"]]
        out["same_node"] = in_the_same_node_as(g.cpu_group)
        out["uneven"] = sp_gather(torch.full((1, 2 + rank), float(rank)), 1, group=g).tolist()
        # Ulysses attention over uneven shards (5 and 6 tokens) with a key mask: the SP length exchange
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 11, 2, 8) for _ in range(3))
        mask = torch.ones(1, 11, dtype=torch.bool)
        mask[0, 9] = False
        mine = slice(0, 5) if rank == 0 else slice(5, 11)
        got = sp_attention(q[:, mine], k[:, mine], v[:, mine], key_padding_mask=mask[:, mine],
                           mesh=SPMesh.from_mesh(mesh))
        want = sp_attention(q, k, v, key_padding_mask=mask)[:, mine]
        out["attention_err"] = (got - want).abs().max().item()
        try:  # refused before any collective, naming the backend
            MessageQueue.create_from_process_group(g.device_group)
        except ValueError as e:
            out["mq_on_device_group"] = str(e)
        g.barrier()
        return out
    finally:
        mesh.destroy()


def test_mesh_puts_every_cpu_tensor_on_gloo(tmp_path: Path) -> None:
    out = run_workers(_mesh_worker, 2, args=(str(tmp_path / "store"),), timeout=120)
    for r in out:
        assert REFUSAL in r["device_group_refuses_cpu"] and r["backend"] == FAKE  # the fake is in effect
        assert r["default_group_sum"] == 2.0
        assert r["object"] == {"step": 3} and r["tensor_dict"] == [[0.0, 1.0, 2.0, 3.0], 7]
        assert r["same_node"] == [True, True]
        assert f"backend (cuda:{FAKE}) takes no CPU tensors" in r["mq_on_device_group"]
        assert r["uneven"] == [[0.0, 0.0, 1.0, 1.0, 1.0]] and r["attention_err"] < 1e-5
    assert out[1]["p2p"] == [30.0, "a"]


def _fanout_worker(rank: int, world: int, store: str) -> list:
    from omni_runtime.runtime.messages import Batch, StepDecision, Stop
    from omni_runtime.runtime.rank_fanout import RankFanout

    mesh = _build_mesh(rank, store, cfg=2)
    fanout = RankFanout(rank, world, mesh)
    try:
        msgs = [Batch(items=[]), StepDecision(drop=[1, 2]), Stop()]
        if rank == 0:
            for m in msgs:
                fanout.send(m)
            return []
        return [type(m := fanout.recv()).__name__ + (str(m.drop) if isinstance(m, StepDecision) else "")
                for _ in msgs]
    finally:
        fanout.close()
        mesh.destroy()


def test_rank_fanout_builds_over_the_gloo_world(tmp_path: Path) -> None:
    out = run_workers(_fanout_worker, 2, args=(str(tmp_path / "store"),), timeout=120)
    assert out == [[], ["Batch", "StepDecision[1, 2]", "Stop"]]


def _worker_spec(stage: str, model: str, rank: int, store: str, parallel: dict):
    from omni_runtime.runtime.stage_worker import WorkerSpec

    return WorkerSpec(stage=stage, replica=0, rank=rank, world_size=2, master_port=0, model_path=model,
                      dtype="float32", device="cpu", in_addr="", out_addr="", max_batch_size=2, batch_timeout_ms=0,
                      instance="t", parent_pid=0, parallel=parallel, rendezvous=f"file://{store}",
                      device_backend=FAKE)


def _text_encoder_stage_worker(rank: int, world: int, model: str, store: str) -> list:
    """A text-encoder stage rank with HSDP 2 started as ``stage_worker`` starts it; the driver broadcasts one batch,
    the follower runs it through ``follow_loop`` (FSDP2 all-gathers pair up), then Stop."""
    from omni_runtime.runtime import stage_shell
    from omni_runtime.runtime.messages import Batch, Stop, Work
    from omni_runtime.runtime.requests import parse_request
    from omni_runtime.runtime.stage_exec import item_of
    from omni_runtime.runtime.stage_worker import start_rank

    _register_fake_nccl()
    mesh, engine, fanout = start_rank(_worker_spec("text_encoder", model, rank, store, {"hsdp_shard": 2}))
    try:
        if rank == 1:
            stage_shell.follow_loop(engine, fanout)
            return []
        work = Work(req_id="r", index=0, seed=1, params=parse_request({"prompt": "a red cube", "seed": 1}))
        fanout.send(Batch(items=[work]))
        (emb,) = engine.step([item_of(work)])
        fanout.send(Stop())
        return [emb[k].flatten().tolist() for k in sorted(emb)]
    finally:
        fanout.close()
        mesh.destroy()


def _single_text_encoder(model: str) -> list:
    from omni_runtime.runtime.requests import parse_request
    from omni_runtime.stages.engine import StageItem, load_engine

    engine = load_engine("text_encoder", model, "float32", "cpu")
    (emb,) = engine.step([StageItem(params=parse_request({"prompt": "a red cube", "seed": 1}), seed=1)])
    return [emb[k].flatten().tolist() for k in sorted(emb)]


def test_stage_start_up_and_a_batch_on_device_groups(tmp_path: Path, tiny_dir: Path) -> None:
    out = run_workers(_text_encoder_stage_worker, 2, args=(str(tiny_dir), str(tmp_path / "store")), timeout=240)
    want = _single_text_encoder(str(tiny_dir))
    got = out[0]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-5)


def _ep_worker(rank: int, world: int, store: str) -> list:
    """Expert parallelism (alltoallv) over the mesh's EP group: counts and tokens are CPU tensors here."""
    from omni_runtime.parallel.all2all import init_expert_parallel
    from omni_runtime.parallel.moe import MoEFeedForward

    mesh = _build_mesh(rank, store, ulysses=2, ep=2, all2all_backend="alltoallv")
    try:
        group = init_expert_parallel(mesh)
        torch.manual_seed(0)
        full = MoEFeedForward(8, 4, 2, 16)
        local = MoEFeedForward(8, 4, 2, 16, ep_group=group, is_sequence_parallel=True)
        local.load_state_dict({k: v for k, v in full.state_dict().items() if k in local.state_dict()})
        group.device_communicator.prepare_communication_buffer_for_model(local)
        x = torch.randn(2, 6, 8)
        mine = x[:, rank * 3:(rank + 1) * 3]
        with torch.no_grad():
            return [(local(mine) - full(mine)).abs().max().item()]
    finally:
        mesh.destroy()


def test_expert_parallel_exchange_on_device_groups(tmp_path: Path) -> None:
    out = run_workers(_ep_worker, 2, args=(str(tmp_path / "store"),), timeout=120)
    assert all(r[0] < 1e-5 for r in out), out
