"""runtime.placement: one node -> ipc in the 0700 run dir, file:// rendezvous, loopback gloo; several -> tcp, frames.

And what the placement promises, served for real: no process of ours listens on a non-loopback address
(issue 14 #3: :func:`assert_listens_on_loopback_only`, run on tests/test_server_sp.py's servers), a SIGKILLed
``serve`` leaves nothing behind once the next one starts (issue 14 #8), and that next one, forced to the ``frames``
tensor transport, returns the image the killed one returned over shm.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from omni_runtime.comm import cleanup
from omni_runtime.comm import instance as rt_instance
from omni_runtime.runtime.cli import describe
from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.placement import TRANSPORT_ENV, compute_placement

ROOT = Path(__file__).resolve().parent.parent


def _cfg(**extra):
    raw = {"model": {"path": str(ROOT / "models" / "tiny-flux")},
           "stages": {"denoiser": {"parallel": {"ulysses": 2, "ring": 2}}}}
    raw.update(extra)
    return config_from_dict(raw)


def test_one_node_uses_ipc_in_the_run_dir_file_store_and_loopback(tmp_path, monkeypatch):
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    p = compute_placement(_cfg(), str(tmp_path))
    assert p.nodes == [p.frontend_node]
    assert p.result_endpoint == f"ipc://{tmp_path}/results"
    den = p.replica("denoiser", 0)
    assert den.work_endpoint(3) == f"ipc://{tmp_path}/denoiser-0-g3.in"
    assert den.rendezvous(3) == f"file://{tmp_path}/denoiser-0-g3.store"  # no TCP store at all
    assert den.env == {"GLOO_SOCKET_IFNAME": "lo"}
    assert [r.local_rank for r in den.ranks] == [0, 1, 2, 3]
    assert den.ranks[3].groups["ulysses"] == [2, 3] and den.ranks[3].groups["ring"] == [1, 3]
    assert {r.tensor_transport for r in p.replicas} == {"shm"}
    assert den.tensor_endpoint(2) == f"ipc://{tmp_path}/denoiser-0-g2.tensors"
    assert p.total_ranks == 6


def test_cuda_ranks_also_pin_nccl_to_loopback(tmp_path):
    cfg = _cfg(model={"path": str(ROOT / "models" / "tiny-flux"), "device": "cuda"})
    den = compute_placement(cfg, str(tmp_path)).replica("denoiser", 0)
    assert [r.device for r in den.ranks] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert den.env == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


def test_several_nodes_use_tcp_and_frames(tmp_path, monkeypatch):
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    cfg = _cfg()
    here = compute_placement(cfg, str(tmp_path)).frontend_node
    p = compute_placement(cfg, str(tmp_path), nodes={"denoiser": ["gpu-a", "gpu-a", "gpu-b", "gpu-b"]})
    den = p.replica("denoiser", 0)
    assert p.nodes == [here, "gpu-a", "gpu-b"]
    assert p.result_endpoint == f"tcp://{here}:*"
    assert den.work_endpoint(1) == "tcp://gpu-a:*" and den.rendezvous(1) == "tcp://gpu-a:*"
    assert den.env == {}
    assert [(r.node, r.local_rank) for r in den.ranks] == [("gpu-a", 0), ("gpu-a", 1), ("gpu-b", 0), ("gpu-b", 1)]
    # text encoder (here) -> denoiser (elsewhere): frames; denoiser -> vae (here): frames; vae -> frontend: shm
    assert [r.tensor_transport for r in p.replicas] == ["frames", "frames", "shm"]
    assert [r.tensor_endpoint(1) for r in p.replicas] == [f"tcp://{here}:*", "tcp://gpu-a:*",
                                                          f"ipc://{tmp_path}/vae-0-g1.tensors"]
    with pytest.raises(ConfigError, match="3 node"):
        compute_placement(cfg, str(tmp_path), nodes={"denoiser": ["a", "b", "c"]})


def test_transport_forced_by_config_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    cfg = _cfg(placement={"tensor_transport": "frames"})
    assert {r.tensor_transport for r in compute_placement(cfg, str(tmp_path)).replicas} == {"frames"}
    monkeypatch.setenv(TRANSPORT_ENV, "shm")
    assert {r.tensor_transport for r in compute_placement(cfg, str(tmp_path)).replicas} == {"shm"}
    monkeypatch.setenv(TRANSPORT_ENV, "carrier-pigeon")
    with pytest.raises(ConfigError, match=rf"{TRANSPORT_ENV} = 'carrier-pigeon': allowed values are 'auto'"):
        compute_placement(cfg, str(tmp_path))


@pytest.mark.parametrize("value", ["tcp", "", 1])
def test_bad_tensor_transport_key_names_it(value):
    with pytest.raises(ConfigError, match=r"^placement\.tensor_transport = "):
        _cfg(placement={"tensor_transport": value})


def test_check_prints_the_placement_the_launcher_uses(tmp_path, monkeypatch):
    from omni_runtime.runtime.launcher import LocalLauncher

    monkeypatch.setenv(rt_instance.INSTANCE_ENV, f"plc{os.getpid()}")
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    cfg = _cfg()
    launcher = LocalLauncher(cfg)  # starts nothing until start_all / start_replica
    try:
        run_dir = launcher.run_dir
        assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
        printed = describe(cfg).replace(str(Path(run_dir).parent / "omni-rt-<instance>"), str(run_dir))
        assert launcher.placement.format() in printed
        specs = launcher.replicas["denoiser"][0].specs()
        assert [s.rendezvous for s in specs] == [f"file://{run_dir}/denoiser-0-g0.store"] * 4
        assert [s.device for s in specs] == ["cpu"] * 4 and [s.local_rank for s in specs] == [0, 1, 2, 3]
        assert specs[0].in_addr == f"ipc://{run_dir}/denoiser-0-g0.in"
        assert specs[0].out_addr == f"ipc://{run_dir}/results"
    finally:
        launcher.shutdown()
    assert not os.path.exists(run_dir)


# ----------------------------------------------------------------------------- dead instances


def test_start_sweeps_what_a_dead_instance_left(monkeypatch):
    from omni_runtime.comm import shm_tensor
    from omni_runtime.runtime.launcher import LocalLauncher

    dead = f"dead{os.getpid()}"
    # a process of instance `dead` makes its run dir, a socket file and a segment, then is SIGKILLed
    code = textwrap.dedent("""
        import os, signal, torch
        from omni_runtime.comm import instance, shm_tensor
        d = instance.run_dir()
        open(os.path.join(d, "x.sock"), "w").close()
        shm_tensor.put(torch.ones(4))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, rt_instance.INSTANCE_ENV: dead},
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL
    run_dir = rt_instance.run_dir_path(dead)
    assert run_dir.is_dir() and len(shm_tensor.list_segments(shm_tensor.instance_prefix(dead))) == 1
    assert rt_instance.owner_alive(run_dir) is False
    monkeypatch.setenv(rt_instance.INSTANCE_ENV, f"new{os.getpid()}")
    launcher = LocalLauncher(_cfg())
    try:
        assert not run_dir.exists()
        assert shm_tensor.list_segments(shm_tensor.instance_prefix(dead)) == []
        assert rt_instance.owner_alive(launcher.run_dir) is True  # ours is alive: a later start leaves it alone
        cleanup.sweep_dead()
        assert launcher.run_dir.exists()
    finally:
        launcher.shutdown()


def test_run_dir_of_another_mode_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    (tmp_path / "omni-rt-open").mkdir(mode=0o755)
    os.chmod(tmp_path / "omni-rt-open", 0o755)
    with pytest.raises(PermissionError, match="mode 0700"):
        rt_instance.run_dir("open")


# ----------------------------------------------------------------------------- served


def _listening(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of ``pids`` (from /proc/net/tcp and tcp6)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(raw) if width == 8 else ipaddress.IPv6Address(raw)
            out.append((inodes[f[9]], str(addr), int(hexport, 16)))
    return out


def _loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def assert_listens_on_loopback_only(server) -> None:
    """No process of a served instance (``test_server_harness.Server``: the frontend, the stages' ranks) listens on
    a non-loopback address (issue 14 #3). Run on the Ulysses servers of tests/test_server_sp.py (ranks that open gloo
    pair sockets), not on a server of its own."""
    ranks = [p.pid for p in server.stage_procs()]
    pids = [server.proc.pid] + [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)]
    listening = _listening(pids)
    assert any(port == server.port for _, _, port in listening)  # the HTTP server is seen, so the probe works
    assert any(pid in ranks for pid, _, _ in listening)  # and the ranks' gloo pair sockets are
    exposed = [x for x in listening if not _loopback(x[1])]
    assert exposed == [], f"listening on a non-loopback address (pid, addr, port): {exposed}"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_sigkilled_serve_leaves_nothing_once_the_next_starts_and_frames_give_the_same_image_as_shm(tmp_path,
                                                                                                  monkeypatch):
    """Two servers, not four: the next server after the SIGKILL (which sweeps the dead one's run dir) is forced to
    the ``frames`` tensor transport and returns, byte for byte, the image the killed one returned over shm."""
    import base64

    import httpx
    from test_server_harness import Server, wait_exited

    body = {"prompt": "a lighthouse at dusk", "seed": 5, "size": "64x64", "num_inference_steps": 2}
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)  # one node: shm
    server = Server(tmp_path)
    run_dirs = list(Path(rt_instance.run_dir_path(server.instance)).parent.glob(f"omni-rt-{server.instance}-*"))
    assert len(run_dirs) == 1
    r = httpx.post(server.url + "/v1/images/generations", json=body, headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text
    shm_png = base64.b64decode(r.json()["data"][0]["b64_json"])
    assert "tensor server on" not in server.log_text()
    assert server.shm_entries() != []  # the stages' pools keep segments for reuse
    ranks = server.stage_procs()
    os.kill(server.proc.pid, signal.SIGKILL)  # not reaped yet: to the ranks it is a zombie, i.e. dead
    try:
        assert wait_exited(ranks, timeout=30) == []  # exited (zombies of the dead frontend count: init reaps them)
        end = time.monotonic() + 10
        while server.shm_entries() and time.monotonic() < end:
            time.sleep(0.1)
        assert server.shm_entries() == []  # every rank unlinked its own segments when its parent died
    finally:
        server.proc.wait(10)
        server.stop()
    assert run_dirs[0].exists()  # nobody removed the dead frontend's run dir ...
    monkeypatch.setenv(TRANSPORT_ENV, "frames")
    (tmp_path / "frames").mkdir()
    second = Server(tmp_path / "frames")
    try:
        assert not run_dirs[0].exists()  # ... until the next start swept it
        r = httpx.post(second.url + "/v1/images/generations", json=body, headers=second.headers, timeout=120)
        assert r.status_code == 200, r.text
        assert "tensor server on ipc://" in second.log_text()  # the stages really served their outputs as frames
        assert base64.b64decode(r.json()["data"][0]["b64_json"]) == shm_png
    finally:
        second.stop()
    assert second.shm_entries() == []
