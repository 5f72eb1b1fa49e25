"""The Ray launcher's keys and the placement it computes, without starting Ray (fast).

Every bad value of ``[placement] launcher / ray_address`` and ``[stages.X] ray_strategy / ray_resources`` is one
ConfigError naming the key; the placement with Ray's nodes gives tcp endpoints on each node's address, frames
between nodes and shm on one node; an unreachable ``ray_address`` is one line within the probe's timeout.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from omni_runtime.comm import node
from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.placement import TRANSPORT_ENV, compute_placement, fill_port

ROOT = Path(__file__).resolve().parent.parent


def _cfg(placement=None, **stages):
    raw = {"model": {"path": str(ROOT / "models" / "tiny-flux")}, "stages": stages}
    if placement is not None:
        raw["placement"] = placement
    return config_from_dict(raw)


def test_defaults_are_local_launcher_private_address_pack_and_no_resources():
    cfg = _cfg()
    assert (cfg.placement.launcher, cfg.placement.ray_address) == ("local", "")
    assert all((cfg.stages.get(s).ray_strategy, cfg.stages.get(s).ray_resources) == ("PACK", {})
               for s in ("text_encoder", "denoiser", "vae"))


def test_good_ray_values_parse():
    cfg = _cfg({"launcher": "ray", "ray_address": "10.0.0.1:6379"},
               denoiser={"ray_strategy": "SPREAD", "ray_resources": {"big_node": 1, "accel": 0.5}},
               vae={"ray_strategy": "STRICT_PACK"})
    assert cfg.placement.launcher == "ray" and cfg.stages.denoiser.ray_resources == {"big_node": 1.0, "accel": 0.5}
    for address in ("", "auto", "head.example:6379", "ray://head:10001", "[::1]:6379"):
        assert _cfg({"launcher": "ray", "ray_address": address}).placement.ray_address == address


@pytest.mark.parametrize(("placement", "stages", "expected"), [
    ({"launcher": "slurm"}, {}, "placement.launcher = 'slurm': allowed values are 'local', 'ray'"),
    ({"launcher": 1}, {}, "placement.launcher = 1 (int): must be a string"),
    ({"ray_address": "nohost"}, {}, "placement.ray_address = 'nohost': allowed: ''"),
    ({"ray_address": "h:0"}, {}, "placement.ray_address = 'h:0': allowed"),
    ({"ray_address": "h:70000"}, {}, "placement.ray_address = 'h:70000': allowed"),
    ({"ray_address": "http://h:1"}, {}, "placement.ray_address = 'http://h:1': allowed"),
    ({"ray_address": 6379}, {}, "placement.ray_address = 6379 (int): must be a string"),
    ({}, {"denoiser": {"ray_strategy": "pack"}},
     "stages.denoiser.ray_strategy = 'pack': allowed values are 'STRICT_PACK', 'PACK', 'SPREAD', 'STRICT_SPREAD'"),
    ({}, {"vae": {"ray_strategy": 3}}, "stages.vae.ray_strategy = 3 (int): must be a string"),
    ({}, {"text_encoder": {"ray_resources": 1}}, "stages.text_encoder.ray_resources = 1 (int): must be a table"),
    ({}, {"denoiser": {"ray_resources": {"big": 0}}}, "stages.denoiser.ray_resources.big = 0 (int): must be a "
                                                      "finite number > 0"),
    ({}, {"denoiser": {"ray_resources": {"big": -1.5}}}, "stages.denoiser.ray_resources.big = -1.5 (float)"),
    ({}, {"denoiser": {"ray_resources": {"big": "1"}}}, "stages.denoiser.ray_resources.big = '1' (str)"),
    ({}, {"denoiser": {"ray_resources": {"big": True}}}, "stages.denoiser.ray_resources.big = True (bool)"),
    ({}, {"denoiser": {"ray_resources": {"big": float("inf")}}}, "stages.denoiser.ray_resources.big = inf"),
    ({}, {"vae": {"ray_resources": {"CPU": 2}}}, "stages.vae.ray_resources.CPU = 2: not allowed here; a rank's "
                                                 "CPUs are its threads"),
    ({}, {"vae": {"ray_resources": {"GPU": 1}}}, "stages.vae.ray_resources.GPU = 1: not allowed here"),
    ({"launcher": "ray"}, {"vae": {"devices": ["cpu"]}},
     "stages.vae.devices = ['cpu'] with placement.launcher = 'ray': Ray assigns each rank its GPU"),
    ({"launcher": "ray", "ray_port": 1}, {}, "placement.ray_port: unknown key"),
])
def test_bad_ray_values_name_the_key(placement, stages, expected):
    with pytest.raises(ConfigError) as e:
        _cfg(placement, **stages)
    assert str(e.value).startswith(expected), str(e.value)


def test_node_id_env_names_the_node(monkeypatch):
    monkeypatch.delenv(node.NODE_ID_ENV, raising=False)
    physical = node.node_id()
    assert physical.startswith(node.node_name() + "|")
    monkeypatch.setenv(node.NODE_ID_ENV, "ray-node-abc")
    assert node.node_id() == "ray-node-abc"


def test_fill_port_fills_only_a_tcp_wildcard():
    assert fill_port("tcp://10.0.0.1:*", 5555) == "tcp://10.0.0.1:5555"
    assert fill_port("tcp://10.0.0.1:*", 0) == "tcp://10.0.0.1:*"
    assert fill_port("ipc:///tmp/x.in", 5555) == "ipc:///tmp/x.in"
    assert fill_port("file:///tmp/x.store", 5555) == "file:///tmp/x.store"


def test_placement_over_ray_nodes_uses_node_addresses_frames_across_and_shm_within(tmp_path, monkeypatch):
    """Text encoder on node A, the denoiser's two ranks on A and B, the VAE on B, the frontend on H (three Ray
    nodes sharing one address, as ray.cluster_utils.Cluster makes them)."""
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    cfg = _cfg({"launcher": "ray"}, denoiser={"parallel": {"ulysses": 2}})
    ip = "192.0.2.7"
    nodes = {"text_encoder": ["A"], "denoiser": ["B", "A"], "vae": ["B"]}
    p = compute_placement(cfg, str(tmp_path), nodes, addresses={"H": ip, "A": ip, "B": ip}, frontend="H",
                          devices={"text_encoder": ["cpu"], "denoiser": ["cpu", "cpu"], "vae": ["cpu"]})
    assert p.nodes == ["H", "A", "B"] and p.launcher == "ray"
    assert p.result_endpoint == f"tcp://{ip}:*"
    te, dn, vae = (p.replica(s, 0) for s in ("text_encoder", "denoiser", "vae"))
    # text encoder (A) -> denoiser (driver B, follower A): another node -> frames from a tcp tensor server
    assert (te.tensor_transport, te.tensor_endpoint(1, 4000)) == ("frames", f"tcp://{ip}:4000")
    # denoiser (driver B) -> VAE (B): one node -> shm
    assert dn.tensor_transport == "shm"
    # the VAE's output goes back to the frontend on H
    assert vae.tensor_transport == "frames"
    # every driver is on another node than the frontend: tcp work endpoints on its address, port filled
    assert te.work_endpoint(2, 5001) == f"tcp://{ip}:5001" and dn.work_endpoint(1, 5002) == f"tcp://{ip}:5002"
    # a replica over two nodes: tcp rendezvous on the driver's address, no loopback-only gloo
    assert dn.rendezvous(1, 6000) == f"tcp://{ip}:6000" and dn.env == {}
    assert [(r.rank, r.node, r.local_rank) for r in dn.ranks] == [(0, "B", 0), (1, "A", 0)]
    # a one-rank replica away from the frontend: no run directory there, so a tcp store; gloo stays on loopback
    assert te.rendezvous(1, 6001) == f"tcp://{ip}:6001" and te.env == {"GLOO_SOCKET_IFNAME": "lo"}
    text = p.format()
    assert f"node A at {ip}" in text and "launcher ray" in text
    assert f"text_encoder[0] on A: work tcp://{ip}:*" in text and "outputs by frames" in text


def test_placement_of_a_private_instance_is_one_node_with_ipc_file_store_and_shm(tmp_path, monkeypatch):
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    cfg = _cfg({"launcher": "ray"}, denoiser={"parallel": {"ulysses": 2}})
    nodes = {"text_encoder": ["H"], "denoiser": ["H", "H"], "vae": ["H"]}
    p = compute_placement(cfg, str(tmp_path), nodes, addresses={"H": "192.0.2.7"}, frontend="H")
    assert p.result_endpoint == f"ipc://{tmp_path}/results"
    for rep in p.replicas:
        assert rep.tensor_transport == "shm" and rep.work_endpoint(1).startswith("ipc://")
    assert p.replica("denoiser", 0).rendezvous(1).startswith("file://")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_probe_of_an_unreachable_ray_address_is_one_config_error():
    from omni_runtime.runtime.ray_connect import probe_ray_address

    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(ConfigError) as e:
        probe_ray_address(address)
    msg = str(e.value)
    assert msg.startswith(f"placement.ray_address = '{address}': cannot reach a Ray head at 127.0.0.1:") and \
        "\n" not in msg
    probe_ray_address("")  # a private instance: nothing to probe


def test_auto_without_a_cluster_on_this_node_is_one_config_error(tmp_path, monkeypatch):
    from omni_runtime.runtime.ray_connect import probe_ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"^placement.ray_address = 'auto': no Ray cluster found on this node"):
        probe_ray_address("auto")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_closed_port()}")
    with pytest.raises(ConfigError, match=r"^placement.ray_address = 'auto': cannot reach a Ray head at 127.0.0.1:"):
        probe_ray_address("auto")  # the recorded cluster is gone


def test_probe_of_a_port_that_is_no_ray_head_fails_within_its_timeout():
    """Something listens but never speaks gRPC: ray.init would retry for minutes; the probe gives up in time."""
    import threading
    import time

    from omni_runtime.runtime.ray_connect import probe_ray_address

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        held = []
        threading.Thread(target=lambda: held.append(srv.accept()), daemon=True).start()
        address = f"127.0.0.1:{srv.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=r"cannot reach a Ray head at 127.0.0.1:\d+ \(no gRPC answer within 1s\)"):
            probe_ray_address(address, timeout=1.0)
        assert time.monotonic() - t0 < 5
        for conn, _ in held:
            conn.close()


@pytest.mark.parametrize("command", ["check", "serve"])
def test_check_and_serve_with_an_unreachable_ray_address_exit_2_with_one_line_within_30s(tmp_path, command):
    import subprocess
    import sys
    import time

    address = f"127.0.0.1:{_closed_port()}"
    cfg = tmp_path / "ray.toml"
    cfg.write_text(f'[model]\npath = "{ROOT / "models" / "tiny-flux"}"\n\n'
                   f'[placement]\nlauncher = "ray"\nray_address = "{address}"\n')
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "omni_runtime.runtime.cli", command, str(cfg)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and r.stdout == "", (r.stdout, r.stderr)
    assert lines[0].startswith(f"omni-runtime {command}: error: placement.ray_address = '{address}': cannot reach "
                               f"a Ray head at 127.0.0.1:"), lines[0]
