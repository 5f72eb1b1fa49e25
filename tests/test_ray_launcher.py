"""The Ray launcher on a real Ray cluster: ``ray.cluster_utils.Cluster`` with a head and two labelled nodes.

One cluster for the whole module (Ray starts slowly on a loaded 2-core machine). The text encoder is pinned to
the small node, the denoiser's two Ulysses ranks to one rank per node, the VAE to the big node; ``serve`` joins
the cluster and is driven with the official openai client. Then: a SIGKILLed rank actor mid-request (503 naming
the stage, rank and node within 5 s; the replica restarts), shutdown (no actor or placement group of ours left,
read from Ray's state; no stage process left), the same pipeline on a private Ray instance (``ray_address = ""``;
no Ray process left after it), and ``check`` printing where Ray would put each rank without starting any.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from test_server_harness import Server, image_of, post_and_kill

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
PROMPT, SEED, SIZE, STEPS = "a lighthouse at dusk", 11, "64x64", 3


def _config(address: str) -> str:
    return f"""
[model]
path = "{ROOT / 'models' / 'tiny-flux'}"

[server]
api_key = ""
request_timeout_s = 300
stall_timeout_s = 6

[placement]
launcher = "ray"
ray_address = "{address}"

[stages.text_encoder]
ray_resources = {{small_node = 1}}

[stages.denoiser]
ray_strategy = "SPREAD"
ray_resources = {{dn = 1}}          # one per labelled node: the two ranks land on different nodes

[stages.denoiser.parallel]
ulysses = 2

[stages.vae]
ray_resources = {{big_node = 1}}
"""


def _ray_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (Ray's session dir: raylet, gcs, workers)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if marker in cmd and p.pid != os.getpid():
            out.append(f"{p.pid} {cmd[:160]}")
    return out


def _wait_gone(marker: str, timeout: float = 30.0) -> list[str]:
    end = time.monotonic() + timeout
    while (left := _ray_processes(marker)) and time.monotonic() < end:
        time.sleep(0.3)
    return left


@pytest.fixture(scope="module")
def ray_tmp():
    """Ray's temp root for the module (RAY_TMPDIR: session dirs, sockets, logs), short for unix socket paths."""
    d = Path(tempfile.mkdtemp(prefix="ort", dir="/tmp"))
    (d / "ray").mkdir()
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(d)
    os.environ["RAY_DEDUP_LOGS"] = "0"  # every rank's log line reaches serve's log
    try:
        yield d
    finally:
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        os.environ.pop("RAY_DEDUP_LOGS", None)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ray_tmp):
    """Head (no CPUs: only the frontend's driver connects there) + a small and a big node, each with a label."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        small = c.add_node(num_cpus=2, resources={"small_node": 2, "dn": 1})
        big = c.add_node(num_cpus=2, resources={"big_node": 2, "dn": 1})
        c.wait_for_nodes(timeout=60)
        ray.init(address=c.address, logging_level="WARNING")
        c.labels = {"small": small.node_id[:8], "big": big.node_id[:8]}
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        left = _wait_gone(str(ray_tmp))
        assert left == [], f"Ray processes of the test cluster still run: {left}"


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The image of the same request from the single-process pipeline (the local launcher's pipeline in this
    process, Omni(in_process=True))."""
    from omni_runtime.runtime import Omni
    from omni_runtime.runtime.config_load import config_from_dict

    cfg = config_from_dict({"model": {"path": str(ROOT / "models" / "tiny-flux")}})
    with Omni(cfg, in_process=True) as omni:
        return np.asarray(omni.generate(PROMPT, seed=SEED, size=SIZE, num_inference_steps=STEPS)[0])


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray-serve")
    (tmp / "ray.toml").write_text(_config(cluster.address))
    server = Server(tmp, base_config=str(tmp / "ray.toml"), timeout=300)
    yield server
    server.stop()


def _openai_image(server: Server) -> np.ndarray:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=server.headers["Authorization"].split()[1], timeout=120,
                    max_retries=0)
    res = client.images.generate(prompt=PROMPT, size=SIZE, response_format="b64_json",
                                 extra_body={"seed": SEED, "num_inference_steps": STEPS})
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))))


_RANK = re.compile(r"^\s+(\w+)\[0\] rank (\d+)/\d+ on \S+: .*\(node (\S+), local rank \d+\)$", re.M)
_REPLICA = re.compile(r"^\s+(\w+)\[0\] on (\S+): work \S+, rendezvous \S+, env .*, outputs by (\w+)", re.M)


def _rank_pids(log: str, stage: str, generation: int) -> list[int]:
    """The pid of every rank of ``stage``'s replica 0 in ``generation``, as the launcher logged them."""
    m = re.search(rf"started {stage}\[0\] \(generation {generation}\) as Ray actors: (.*)$", log, re.M)
    assert m is not None, f"no start of {stage}[0] generation {generation} in the log"
    return [int(p) for p in re.findall(r"rank \d+ pid (\d+)", m.group(1))]


AFTER = {"prompt": "after", "seed": 2, "size": "32x32", "num_inference_steps": 1}  # the request around a restart


def _generation(log: str, stage: str = "denoiser") -> int:
    """The latest generation of ``stage``'s replica 0 the launcher started (each test starts from whatever the
    tests before it left: the module shares one server, and a test may run alone)."""
    found = [int(g) for g in re.findall(rf"started {stage}\[0\] \(generation (\d+)\) as Ray actors", log)]
    assert found, f"no start of {stage}[0] in the log"
    return max(found)


def _reported(log: str) -> tuple[dict[tuple[str, int], str], dict[str, str]]:
    """From the launcher's reported placement in serve's log: (stage, rank) -> node, stage -> output road."""
    text = log[log.index("Ray placed every replica:"):]
    text = text[:text.index("total processes:")]
    return ({(s, int(r)): n for s, r, n in _RANK.findall(text)}, {s: road for s, _, road in _REPLICA.findall(text)})


def test_served_across_nodes_matches_the_local_pipeline(served, cluster, reference):
    image = _openai_image(served)
    diff = np.abs(image.astype(int) - reference.astype(int))
    assert diff.max() <= 1, f"max |delta| {diff.max()}/255"  # <= 1/255
    log = served.log_text()
    nodes, roads = _reported(log)
    small, big = cluster.labels["small"], cluster.labels["big"]
    assert nodes[("text_encoder", 0)].startswith(small) and nodes[("vae", 0)].startswith(big)
    dn = {nodes[("denoiser", 0)][:8], nodes[("denoiser", 1)][:8]}
    assert dn == {small, big}, nodes  # the replica spans both nodes
    # text encoder (small node) -> denoiser (on both nodes): another node -> frames, served over tcp
    assert roads["text_encoder"] == "frames"
    assert re.search(r"text_encoder\[0\] rank 0/1 omni_runtime\.comm\.tensor_transport: tensor server on tcp://",
                     log), "the text encoder's tensor server did not start on tcp"
    # denoiser -> VAE: frames exactly when its driver is not on the VAE's node
    same = nodes[("denoiser", 0)] == nodes[("vae", 0)]
    assert roads["denoiser"] == ("shm" if same else "frames")
    # the follower on the other node reads the driver's batch broadcast as a remote reader (tcp)
    assert "sequence parallel over 2 ranks" in log
    assert re.search(r"denoiser\[0\] rank 0/2 omni_runtime\.runtime\.rank_fanout: batch broadcast to 0 local "
                     r"reader\(s\) \(shm ring\) and 1 remote reader\(s\) \(tcp\)", log), "no remote reader"


def test_a_killed_rank_actor_is_503_naming_stage_rank_and_node_then_restarts(served):
    nodes, _ = _reported(served.log_text())
    gen = _generation(served.log_text())
    before = image_of(served, AFTER)
    victim = psutil.Process(_rank_pids(served.log_text(), "denoiser", gen)[1])  # the launcher reports the pids
    body = {"prompt": "slow", "seed": 3, "size": "256x256", "n": 4, "num_inference_steps": 200}
    r, took = post_and_kill(served, victim, body, timeout=240, busy_cpu_s=0.5)
    assert r.status_code == 503, r.text
    msg = r.json()["error"]["message"]
    assert msg.startswith("stage denoiser failed: denoiser[0] rank 1 died"), msg
    assert f"on node {nodes[('denoiser', 1)]}" in msg, msg
    assert took < 5.0, f"the 503 came {took:.1f}s after the kill"
    # the replica is restarted through the launcher (new actors, the next generation); the next request succeeds
    assert np.array_equal(image_of(served, AFTER), before)  # the restarted replica computes the same image
    assert f"started denoiser[0] (generation {gen + 1}) as Ray actors" in served.log_text()


def test_a_hung_rank_actor_is_503_naming_it_hung_then_restarts(served):
    """Issue 31 under Ray: a SIGSTOPped rank actor (its heartbeats travel over tcp) fails its replica fast, the
    replica restarts with new actors, the next request succeeds."""
    import threading

    gen = _generation(served.log_text())
    before = image_of(served, AFTER)
    victim = psutil.Process(_rank_pids(served.log_text(), "denoiser", gen)[1])
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=served_post(served, {
        "prompt": "slow", "seed": 3, "size": "256x256", "n": 4, "num_inference_steps": 200})))
    busy_from = victim.cpu_times().user
    t.start()
    end = time.monotonic() + 120
    while victim.cpu_times().user - busy_from < 0.5:
        assert time.monotonic() < end and "r" not in out
        time.sleep(0.05)
    stopped = time.monotonic()
    victim.send_signal(signal.SIGSTOP)
    t.join(240)
    took = time.monotonic() - stopped
    assert out["r"].status_code == 503, out["r"].text
    msg = out["r"].json()["error"]["message"]
    assert msg.startswith("stage denoiser failed: denoiser[0] rank 1 hung on node "), msg
    assert took < 6 + 20, f"the 503 came {took:.1f}s after the stop"
    assert np.array_equal(image_of(served, AFTER), before)  # the restarted replica computes the same image
    assert f"started denoiser[0] (generation {gen + 1}) as Ray actors" in served.log_text()
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE


def served_post(server: Server, body: dict):
    import httpx

    return httpx.post(server.url + "/v1/images/generations", json=body, headers=server.headers, timeout=300)


def test_shutdown_leaves_no_actor_placement_group_or_stage_process(served, cluster):
    from ray.util.placement_group import placement_group_table

    log = served.log_text()
    pids = (_rank_pids(log, "text_encoder", 1) + _rank_pids(log, "denoiser", 3) + _rank_pids(log, "vae", 1))
    ours = [psutil.Process(p) for p in pids]  # te, the twice restarted denoiser's 2 ranks, vae
    named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert len([n for n in named if n.startswith("omni-")]) == 4, named
    assert served.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    assert served.shm_entries() == []
    # Ray's state (GCS) before the cluster shuts down: no actor and no live placement group of ours
    named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert [n for n in named if n.startswith("omni-")] == [], named
    groups = placement_group_table()
    mine = {g["name"]: g["state"] for g in groups.values() if g["name"].startswith("omni-")}
    assert len(mine) == 3 and set(mine.values()) == {"REMOVED"}, mine
    # and the process table: the rank actors' processes are gone
    _, alive = psutil.wait_procs(ours, timeout=30)
    assert alive == [], alive


def test_omni_on_the_cluster_reports_its_placement_and_close_removes_every_actor_and_group(cluster, reference):
    """The Python API in a process that already is a Ray driver: the launcher uses that connection (and leaves it
    open), reports where each rank runs, and ``Omni.close()`` removes every actor and placement group it made."""
    from ray.util.placement_group import placement_group_table

    from omni_runtime.runtime import Omni
    from omni_runtime.runtime.config_load import config_from_dict
    from omni_runtime.runtime.config_load import tomllib as toml

    cfg = config_from_dict(toml.loads(_config(cluster.address)))
    before = set(placement_group_table())
    with Omni(cfg) as omni:
        report = omni._orch.stages.launcher.report()
        image = np.asarray(omni.generate(PROMPT, seed=SEED, size=SIZE, num_inference_steps=STEPS)[0])
        pids = [rk["pid"] for rep in report["replicas"] for rk in rep["ranks"]]
    assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1
    by_stage = {rep["stage"]: [rk["node"][:8] for rk in rep["ranks"]] for rep in report["replicas"]}
    assert by_stage["text_encoder"] == [cluster.labels["small"]] and by_stage["vae"] == [cluster.labels["big"]]
    assert sorted(by_stage["denoiser"]) == sorted(cluster.labels.values())
    assert ray.is_initialized()  # not ours to shut down
    assert [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("omni-")] == []
    new = {k: v for k, v in placement_group_table().items() if k not in before}
    assert len(new) == 3 and {g["state"] for g in new.values()} == {"REMOVED"}, new
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30)
    assert alive == [], alive


def test_check_prints_where_ray_would_put_each_rank_and_starts_none(cluster, tmp_path):
    from ray.util.placement_group import placement_group_table

    cfg = tmp_path / "ray.toml"
    cfg.write_text(_config(cluster.address))
    before = set(placement_group_table())
    r = subprocess.run([sys.executable, "-m", "omni_runtime.runtime.cli", "check", str(cfg)], capture_output=True,
                       text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"ray: connected to '{cluster.address}'" in r.stdout
    nodes = dict(((s, int(k)), n) for s, k, n in _RANK.findall(r.stdout))
    assert nodes[("text_encoder", 0)].startswith(cluster.labels["small"])
    assert nodes[("vae", 0)].startswith(cluster.labels["big"])
    assert {nodes[("denoiser", 0)][:8], nodes[("denoiser", 1)][:8]} == set(cluster.labels.values())
    assert "config OK" in r.stdout
    new = {k: v for k, v in placement_group_table().items() if k not in before}
    assert new and {g["state"] for g in new.values()} == {"REMOVED"}  # placed, read, removed
    assert [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("omni-")] == []


def test_private_instance_serves_the_same_image_and_stops_every_ray_process(cluster, reference, tmp_path):
    """``ray_address = ""``: serve starts its own Ray (one node: ipc, file store, shm) and stops it again."""
    priv = Path(tempfile.mkdtemp(prefix="orp", dir="/tmp"))
    (priv / "ray").mkdir()
    (tmp_path / "ray.toml").write_text(_config(""))
    old = os.environ["RAY_TMPDIR"]
    os.environ["RAY_TMPDIR"] = str(priv)  # the server's environment: its own Ray session dir
    try:
        server = Server(tmp_path, base_config=str(tmp_path / "ray.toml"), timeout=300)
    finally:
        os.environ["RAY_TMPDIR"] = old
    try:
        assert _ray_processes(str(priv)), "the private Ray instance is not running"
        image = _openai_image(server)
        log = server.log_text()
    finally:
        rc = server.stop(signal.SIGINT)  # Ctrl-C: the same graceful shutdown as SIGTERM
    try:
        assert rc in (0, 130, -signal.SIGINT), rc  # 130: the CLI's exit status after Ctrl-C
        diff = np.abs(image.astype(int) - reference.astype(int))
        assert diff.max() <= 1, f"max |delta| {diff.max()}/255"
        nodes, roads = _reported(log)
        assert len(set(nodes.values())) == 1 and set(roads.values()) == {"shm"}, (nodes, roads)
        assert server.leftover == [] and server.shm_entries() == []
        assert _wait_gone(str(priv)) == [], "a process of the private Ray instance outlived serve"
    finally:
        shutil.rmtree(priv, ignore_errors=True)
