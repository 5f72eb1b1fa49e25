"""Hung ranks (issue 31): a rank that stops sending heartbeats, or stays in one step or collective past
``[server] stall_timeout_s``, fails its replica like a crash (503 naming the stage, the rank and "hung"; SIGKILL and
restart; the node's compute token freed at once), and ``/health`` / ``/metrics`` say so. Plus the smaller findings of
the same probe: 405 ``Allow``, the OpenAPI answers of ``/v1/requests/{id}`` and ``/metrics``, a GPU-only
``all2all_backend`` on CPU with ``ep = 1``, ``OMNI_RUNTIME_INSTANCE`` in the preflight, the signal in a death's 503.

The ``serve`` tests SIGSTOP ranks of the shared tiny model (one server per config, several checks per server)."""

from __future__ import annotations

import base64
import re
import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import load_config
from omni_runtime.runtime.liveness import Busy, RankWatch, heartbeat_interval
from omni_runtime.runtime.messages import Heartbeat

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _beat(rank: int, generation: int = 1, busy_s: float = 0.0) -> Heartbeat:
    return Heartbeat(stage="denoiser", replica=0, rank=rank, generation=generation, pid=1, busy_s=busy_s)


# ------------------------------------------------------------------------------------------------ the judge


def test_rank_watch_names_a_silent_rank_and_ignores_other_generations():
    clock = Clock()
    w = RankWatch(2, 4.0, grace_s=10.0, clock=clock)
    w.reset(generation=1)
    w.beat(_beat(0))
    w.beat(_beat(1))
    clock.t += 5.0
    assert w.hung() is None  # loading: silence may last stall_timeout_s + grace
    w.loaded()  # announced Ready
    w.beat(_beat(0))
    w.beat(_beat(1))
    clock.t += 3.9
    assert not w.beat(_beat(1, generation=0))  # a late beat of the killed generation does not count
    assert not w.beat(_beat(5))                 # nor one naming no rank of the replica
    w.beat(_beat(0))
    assert w.hung() is None
    clock.t += 0.2
    rank, why = w.hung()
    assert rank == 1 and "no heartbeat for 4.1s" in why and "stall_timeout_s = 4" in why


def test_rank_watch_busy_step_past_the_limit_names_the_silent_peer_if_any():
    clock = Clock()
    w = RankWatch(2, 4.0, grace_s=10.0, clock=clock)
    w.reset(generation=3)
    w.loaded()
    w.beat(_beat(0, 3))
    w.beat(_beat(1, 3))
    for _ in range(9):  # both beat; rank 0 has been in one step for 4.5 s
        clock.t += 0.5
        w.beat(_beat(0, 3, busy_s=clock.t - 1000.0))
        w.beat(_beat(1, 3, busy_s=clock.t - 1000.0 - 0.1))
    rank, why = w.hung()
    assert rank == 0 and why == "has been in one step or collective for 4.5s (stall_timeout_s = 4)"
    # rank 1 went silent 2 s ago while rank 0 waits in a collective: rank 1 is the culprit, before its own limit
    w.reset(generation=4)
    w.loaded()
    w.beat(_beat(1, 4))
    clock.t += 2.0
    w.beat(_beat(0, 4, busy_s=4.5))
    rank, why = w.hung()
    assert rank == 1 and "no heartbeat for 2.0s while rank 0 waited 4.5s" in why
    # rank 0 was stopped mid-step (its last beat said busy 2.5 s) while rank 1 waits for work and beats: its step is
    # past the limit before its silence is, and the reason says it is silent too
    w.reset(generation=5)
    w.loaded()
    w.beat(_beat(0, 5, busy_s=2.5))
    for _ in range(4):
        clock.t += 0.5
        w.beat(_beat(1, 5))
    rank, why = w.hung()
    assert rank == 0 and why == ("has been in one step or collective for 4.5s (stall_timeout_s = 4); it sent no "
                                 "heartbeat for 2.0s: the process is stopped or frozen")


def test_rank_watch_start_grace_forgive_and_off():
    clock = Clock()
    w = RankWatch(1, 4.0, grace_s=10.0, clock=clock)
    assert w.hung() is None  # not started
    w.reset(generation=1)
    clock.t += 13.9
    assert w.hung() is None  # no first beat yet, within stall_timeout_s + grace
    clock.t += 0.2
    assert w.hung()[0] == 0
    w.reset(generation=5)
    w.beat(_beat(0, 5))
    clock.t += 14.1  # loading (not Ready yet): silent past stall_timeout_s + grace
    rank, why = w.hung()
    assert rank == 0 and "(stall_timeout_s = 4 + 10s while loading)" in why
    w.reset(generation=2)
    w.loaded()
    w.beat(_beat(0, 2))
    clock.t += 5.0
    w.forgive()  # the frontend itself was stalled: every clock restarts
    assert w.hung() is None
    off = RankWatch(1, 0.0, clock=clock)
    off.reset(1)
    clock.t += 1e6
    assert off.hung() is None
    assert heartbeat_interval(4.0) == 0.5 and heartbeat_interval(0.8) == 0.1


def test_busy_times_steps_not_waits():
    clock = Clock()
    b = Busy(clock)
    assert b.seconds() == 0.0
    with b:
        clock.t += 2.0
        assert b.seconds() == 2.0
        b.lap()  # a step boundary
        clock.t += 1.0
        assert b.seconds() == 1.0
        with b.paused():  # waiting for the driver / the compute turn
            clock.t += 50.0
            assert b.seconds() == 0.0
        clock.t += 0.5
        assert b.seconds() == 0.5
    assert b.seconds() == 0.0
    b.lap()  # idle: stays idle
    assert b.seconds() == 0.0


def test_heartbeat_thread_sends_busy_time_and_stops(tmp_path):
    from omni_runtime.comm.channel import SyncReceiver
    from omni_runtime.runtime.messages import Outbound
    from omni_runtime.runtime.stage_shell import Heartbeat as HeartbeatThread

    addr = f"ipc://{tmp_path}/results"
    with SyncReceiver(addr) as rx:
        busy = Busy()
        beat = HeartbeatThread(addr, _beat(1, 7), busy, 0.05).start()
        try:
            first = rx.recv(Outbound, timeout=30)
            assert (first.rank, first.generation, first.busy_s) == (1, 7, 0.0)
            with busy:
                end = time.monotonic() + 30
                while True:
                    msg = rx.recv(Outbound, timeout=30)
                    if msg.busy_s > 0.1:
                        break
                    assert time.monotonic() < end
        finally:
            beat.stop()
        assert not beat.thread.is_alive()
        while True:  # drain what was sent before the stop; then nothing more comes
            try:
                rx.recv(Outbound, timeout=0.5)
            except Exception:
                break


def test_compute_token_says_who_holds_it_while_another_waits(tmp_path):
    from omni_runtime.runtime.cores import ComputeToken

    den, te = ComputeToken(tmp_path / "t", label="denoiser[0]"), ComputeToken(tmp_path / "t", label="text_encoder[0]")
    busy = Busy()
    busy.token = te
    assert busy.waiting_for() == ""
    den.acquire()
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (te.acquire(), got.set()))
    waiter.start()
    try:
        end = time.monotonic() + 30
        while not te.waiting:
            assert time.monotonic() < end
            time.sleep(0.01)
        assert busy.waiting_for() == "denoiser[0]" and not got.is_set()
    finally:
        den.release()
        waiter.join(30)
    assert got.is_set() and not te.waiting and te.holder() == "text_encoder[0]" and busy.waiting_for() == ""
    te.release()
    den.close()
    te.close()


def _fake_orchestrator(timeout_s: float = 60.0, **clients):
    from fake_stages import fake_stages

    from omni_runtime.runtime.config_load import config_from_dict
    from omni_runtime.runtime.orchestrator import Orchestrator

    stages = fake_stages(delay=0.01)
    for stage, make in clients.items():
        stages.clients[stage] = [make(stage)]
    cfg = config_from_dict({"model": {"path": str(ROOT / "models" / "tiny-flux")},
                            "server": {"request_timeout_s": timeout_s}})
    return Orchestrator(cfg, stages=stages)


def test_a_timeout_while_waiting_for_the_compute_turn_names_its_holder():
    """Issue 31: a request stuck in the text encoder because the denoiser holds the node's compute turn used to get
    a 504 naming only the text encoder."""
    import asyncio

    from fake_stages import FakeClient

    from omni_runtime.runtime.orchestrator import DeadlineExceeded
    from omni_runtime.runtime.requests import parse_request

    class Waiting(FakeClient):
        def __init__(self, stage):
            super().__init__(stage, delay=3600)

        def waiting_for(self):
            return "denoiser[0]"

    async def scenario():
        orch = _fake_orchestrator(timeout_s=0.3, text_encoder=Waiting)
        await orch.start()
        try:
            with pytest.raises(DeadlineExceeded) as e:
                await orch.generate(parse_request({"prompt": "x", "seed": 1}))
        finally:
            await orch.shutdown()
        return str(e.value)

    message = asyncio.run(scenario())
    assert message == ("the request exceeded request_timeout_s=0.3 in stage text_encoder (waiting for the node's "
                       "compute turn, which denoiser[0] holds; cpu_sharing = 'exclusive')")


def test_orchestrator_fails_a_hung_replica_and_reports_it_until_ready_again():
    """The health tick finds a hung rank: in-flight items fail with 503 naming stage, rank and "hung", the replica
    is restarted once, and /health's replica state and the gauge follow (no processes: a fake client)."""
    import asyncio

    from fake_stages import FakeClient

    from omni_runtime.runtime.orchestrator import StageUnavailable
    from omni_runtime.runtime.requests import parse_request

    class Hangs(FakeClient):
        restartable = True

        def __init__(self, stage):
            super().__init__(stage, delay=3600)
            self.restarts, self.stuck, self.killing = 0, False, False
            self.release = asyncio.Event()

        def hung(self):
            return (1, "sent no heartbeat for 4.2s (stall_timeout_s = 4): the process is stopped or frozen") \
                if self.stuck else None

        async def restart(self, delay):
            self.restarts += 1
            self.stuck = False
            await self.release.wait()  # "loading": the test looks at the states meanwhile
            self.ready = True
            self.on_ready(self)

    async def scenario():
        orch = _fake_orchestrator(denoiser=Hangs)
        await orch.start()
        den = orch.replicas["denoiser"][0]
        try:
            job = asyncio.ensure_future(orch.generate(parse_request({"prompt": "x", "seed": 1})))
            while den.outstanding == 0:
                await asyncio.sleep(0.01)
            den.stuck = True
            with pytest.raises(StageUnavailable) as e:
                await asyncio.wait_for(job, 30)
            during = orch.replica_health()["denoiser"][0]
            gauge = orch.metrics.replicas.labels(stage="denoiser", state="restarting")._value.get()
            den.release.set()
            while not den.ready:
                await asyncio.sleep(0.01)
            orch.publish_states()
            after = orch.replica_health()["denoiser"][0]
            ready = orch.metrics.replicas.labels(stage="denoiser", state="ready")._value.get()
        finally:
            await orch.shutdown()
        return str(e.value), during, gauge, after, ready, den.restarts

    message, during, gauge, after, ready, restarts = asyncio.run(scenario())
    assert message == ("stage denoiser failed: denoiser[0] (fake) rank 1 hung: it sent no heartbeat for 4.2s "
                       "(stall_timeout_s = 4): the process is stopped or frozen; the replica is being restarted, "
                       "retry the request")
    assert during["state"] == "restarting" and during["last_failure"]["cause"] == "hung" and gauge == 1
    assert after["state"] == "ready" and after["last_failure"]["rank"] == 1 and ready == 1 and restarts == 1


# ------------------------------------------------------------------------------------------------ config, preflight


def _config(tmp_path: Path, server: str = "", denoiser_parallel: str = "") -> Path:
    text = (ROOT / "configs" / "default.toml").read_text()
    text = text.replace('path = "../models/', f'path = "{ROOT / "models"}/')
    if server:
        text = text.replace("[server]\n", f"[server]\n{server}\n", 1)
    if denoiser_parallel:
        text = text.replace("[stages.denoiser.parallel]\n", f"[stages.denoiser.parallel]\n{denoiser_parallel}\n", 1)
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_stall_timeout_default_zero_and_bad_values(tmp_path):
    assert load_config(_config(tmp_path)).server.stall_timeout_s == 30.0
    assert load_config(_config(tmp_path, "stall_timeout_s = 0")).server.stall_timeout_s == 0.0
    for bad in ("-1", "0.01", "1e9"):
        with pytest.raises(ConfigError, match=r"server\.stall_timeout_s = .*allowed values are 0 .* or a number of "
                                              r"seconds from 0\.1 to 86400"):
            load_config(_config(tmp_path, f"stall_timeout_s = {bad}"))
    for bad in ("nan", "inf"):
        with pytest.raises(ConfigError, match=r"server\.stall_timeout_s = .*: must be a finite number"):
            load_config(_config(tmp_path, f"stall_timeout_s = {bad}"))
    with pytest.raises(ConfigError, match=r"server\.stall_timeout_s"):
        load_config(_config(tmp_path, 'stall_timeout_s = "10"'))


def test_gpu_only_all2all_backend_on_cpu_is_refused_with_ep_1(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.denoiser\.parallel\.all2all_backend = 'deepep_low_latency': "
                                          r"needs CUDA GPUs .* allowed on CPU: 'naive', 'agrs', 'alltoallv'"):
        load_config(_config(tmp_path, denoiser_parallel='all2all_backend = "deepep_low_latency"'))


def test_bad_instance_env_is_a_preflight_error(tmp_path, monkeypatch, capsys):
    from omni_runtime.runtime.cli import main
    from omni_runtime.runtime.preflight import check_environment

    assert "not set" in check_environment({})
    assert "'ok-1.a'" in check_environment({"OMNI_RUNTIME_INSTANCE": "ok-1.a"})
    for bad in ("bad_name", "", "x" * 65, "a/b"):
        with pytest.raises(ConfigError, match=r"environment variable OMNI_RUNTIME_INSTANCE = .*allowed values are "
                                              r"1-64 characters from \[A-Za-z0-9.-\]"):
            check_environment({"OMNI_RUNTIME_INSTANCE": bad})
    monkeypatch.setenv("OMNI_RUNTIME_INSTANCE", "bad_name")
    assert main(["check", str(ROOT / "configs" / "default.toml")]) == 2
    assert "OMNI_RUNTIME_INSTANCE = 'bad_name'" in capsys.readouterr().err


def test_a_death_names_the_signal():
    from omni_runtime.runtime.orchestrator import Orchestrator

    assert Orchestrator.exit_text(-9) == "killed by signal SIGKILL"
    assert Orchestrator.exit_text(-15) == "killed by signal SIGTERM"
    assert Orchestrator.exit_text(3) == "exit code 3"
    assert Orchestrator.exit_text(None) == "exit status unknown"


# ------------------------------------------------------------------------------------------------ HTTP edges


def test_405_has_allow_and_openapi_documents_404_and_metrics_type():
    from http_stub_server import ThreadServer, stub_config

    with ThreadServer(stub_config(api_key="k")) as srv:
        for method, path, allow in (("TRACE", "/health", "GET"), ("POST", "/metrics", "GET"),
                                    ("DELETE", "/v1/models", "GET"), ("PUT", "/v1/images/generations", "POST"),
                                    ("POST", "/v1/requests/abc", "GET")):
            r = httpx.request(method, srv.url + path)
            assert r.status_code == 405 and r.headers.get("allow") == allow, (method, path, r.headers)
            assert r.json()["error"]["message"] == "Method Not Allowed"
        paths = httpx.get(srv.url + "/openapi.json").json()["paths"]
        assert "404" in paths["/v1/requests/{request_id}"]["get"]["responses"]
        assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
        assert httpx.get(srv.url + "/metrics").headers["content-type"].startswith("text/plain")
        missing = httpx.get(srv.url + "/v1/requests/nope", headers={"Authorization": "Bearer k"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_health_is_503_only_while_a_stage_has_no_ready_replica():
    from http_stub_server import ThreadServer, stub_config

    with ThreadServer(stub_config()) as srv:
        answers = []
        for denoiser in ([True, True], [True, False], [False, False]):
            srv.stub.health = lambda d=denoiser: {"text_encoder": [True], "denoiser": d, "vae": [True]}
            r = httpx.get(srv.url + "/health")
            answers.append((r.status_code, r.json()["status"]))
    assert answers == [(200, "ok"), (200, "degraded"), (503, "unavailable")]


# ------------------------------------------------------------------------------------------------ through serve

STALL_S = 3.0
EDITS = {"request_timeout_s = 600": f"request_timeout_s = 120\nstall_timeout_s = {STALL_S:g}"}
EXCLUSIVE = '\n[placement]\ncpu_sharing = "exclusive"\n'  # the stages take turns: a hung one holds the token
REF = {"prompt": "a lighthouse after a hang", "seed": 5, "size": "64x64", "num_inference_steps": 2}
SLOW = {"prompt": "slow", "seed": 3, "size": "384x384", "num_inference_steps": 200}


def _post(server, body: dict, timeout: float = 120.0, rid: str | None = None) -> httpx.Response:
    headers = dict(server.headers, **({"X-Request-Id": rid} if rid else {}))
    return httpx.post(server.url + "/v1/images/generations", json=body, headers=headers, timeout=timeout)


def _image(r: httpx.Response) -> bytes:
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["data"][0]["b64_json"])


class HealthSampler:
    """Polls /health in a thread; ``samples``: (status code, body)."""

    def __init__(self, server) -> None:
        self.server, self.samples, self.done = server, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.1):
            try:
                r = httpx.get(self.server.url + "/health", timeout=5)
                self.samples.append((r.status_code, r.json()))
            except httpx.HTTPError:
                pass

    def stop(self) -> list[tuple[int, dict]]:
        self.done.set()
        self.thread.join(10)
        return self.samples


def _victim(server, stage: str, rank: int, world: int) -> psutil.Process:
    """The one live process of that rank; waits (bounded) while a process of a killed generation is still exiting."""
    name = f"{stage}[0] rank {rank}/{world}"
    end = time.monotonic() + 60
    while True:
        found, seen = [], []
        for p in server.stage_procs():
            try:
                title, status = " ".join(p.cmdline()), p.status()
            except psutil.NoSuchProcess:
                continue
            seen.append((p.pid, title, status))
            if name in title and status not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                found.append(p)
        if len(found) == 1:
            return found[0]
        assert time.monotonic() < end, (name, seen)
        time.sleep(0.1)


def _stop_mid_request(server, victim: psutil.Process, then=None) -> tuple[httpx.Response, float]:
    """POST a long request, SIGSTOP ``victim`` once the request has done a denoising step (then call ``then``);
    returns the response and the seconds from the stop to it."""
    rid = uuid.uuid4().hex
    out: dict = {}

    def post() -> None:
        out["r"] = _post(server, SLOW, rid=rid)
        out["t"] = time.monotonic()

    t = threading.Thread(target=post)
    t.start()
    end = time.monotonic() + 120
    while True:
        p = httpx.get(f"{server.url}/v1/requests/{rid}", headers=server.headers, timeout=10)
        if p.status_code == 200 and p.json()["steps_done"] >= 1:
            break
        assert time.monotonic() < end and "r" not in out, out
        time.sleep(0.05)
    stopped = time.monotonic()
    victim.send_signal(signal.SIGSTOP)
    if then is not None:
        then()
    t.join(150)
    return out["r"], out["t"] - stopped


def _stop_while_it_waits_for_its_turn(server, victim: psutil.Process) -> tuple[httpx.Response, float]:
    """Stop a stage in the middle of a request: the test takes the node's compute turn (``cpu_sharing =
    "exclusive"``), POSTs a request, and once the stage has taken it from its queue and waits for the turn (it holds
    the turn's "waiting" lock: the other stages are idle), SIGSTOPs it and gives the turn back. The stopped waiter
    keeps that lock, so giving the turn back blocks until the replica's kill drops it; returns the response and the
    seconds from the stop to it. (The tiny text encoder computes for milliseconds: a stop cannot be aimed inside its
    forward pass from outside; this is the nearest point that is certain.)"""
    from omni_runtime.runtime.cores import ComputeToken

    paths = {f.path for f in victim.open_files() if f.path.endswith("compute.token")}
    assert len(paths) == 1, paths
    token = ComputeToken(paths.pop(), label="the test")
    token.acquire()
    out: dict = {}

    def post() -> None:
        out["r"] = _post(server, REF)
        out["t"] = time.monotonic()

    t = threading.Thread(target=post)
    t.start()
    try:
        end = time.monotonic() + 120
        while not token.others_waiting():
            assert time.monotonic() < end and "r" not in out, out
            time.sleep(0.05)
        stopped = time.monotonic()
        victim.send_signal(signal.SIGSTOP)
    finally:
        giver = threading.Thread(target=token.release, daemon=True)  # returns once the stopped waiter is gone
        giver.start()
    t.join(150)
    giver.join(150)
    assert not giver.is_alive()
    token.close()
    return out["r"], out["t"] - stopped


def _check_hang(server, stage: str, rank: int, world: int, ref: bytes, pids: set[int], *, mid_request: bool,
                failures: int, meanwhile: bool = False, turn_wait: bool = False) -> None:
    """One hang: the 503 names stage, rank and "hung" in about stall_timeout_s; with ``meanwhile``, a request sent
    right after the stop (it waits for the compute token the hung replica holds, then for the restart) gets the
    reference image; /health was 503 with the replica hung/restarting and is 200 again; /metrics counts it.
    ``turn_wait``: stopped with the request taken, waiting for the compute turn (:func:`_stop_while_it_waits_for_its_turn`)."""
    victim = _victim(server, stage, rank, world)
    sampler = HealthSampler(server)
    side: dict = {}

    def send_meanwhile() -> None:
        side["thread"] = threading.Thread(target=lambda: side.update(r=_post(server, REF)))
        side["thread"].start()

    try:
        if turn_wait:
            r, after = _stop_while_it_waits_for_its_turn(server, victim)
        elif mid_request:
            r, after = _stop_mid_request(server, victim, send_meanwhile if meanwhile else None)
        else:  # an idle stage: the next request is the one that finds it hung
            victim.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            r = _post(server, SLOW)
            after = time.monotonic() - t0
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert f"{stage}[0] rank {rank} hung" in message and f"stall_timeout_s = {STALL_S:g}" in message, message
        assert after < STALL_S + 20, after  # request_timeout_s is 120
        if meanwhile:
            side["thread"].join(150)
            assert _image(side["r"]) == ref
        assert _image(_post(server, REF)) == ref
        end = time.monotonic() + 120
        while httpx.get(server.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.1)
    finally:
        samples = sampler.stop()
        if victim.is_running():
            victim.send_signal(signal.SIGCONT)  # killed already unless the test failed first
    bad = [body for code, body in samples if code == 503]
    assert bad and bad[0]["status"] == "unavailable" and bad[0]["replicas"][stage][0]["state"] in ("hung", "restarting")
    assert any(b["replicas"][stage][0]["state"] == "restarting" for b in bad)
    health = httpx.get(server.url + "/health").json()
    rep = health["replicas"][stage][0]
    assert health["status"] == "ok" and rep["state"] == "ready" and rep["last_failure"]["cause"] == "hung"
    assert rep["last_failure"]["rank"] == rank
    metrics = httpx.get(server.url + "/metrics").text
    assert f'omni_replicas{{stage="{stage}",state="ready"}} 1.0' in metrics
    assert f'omni_replica_failures_total{{cause="hung",stage="{stage}"}} {failures:.1f}' in metrics
    assert not psutil.pid_exists(victim.pid) or psutil.Process(victim.pid).status() == psutil.STATUS_ZOMBIE
    pids.update(p.pid for p in server.stage_procs())


def _wait_for_log(server, line: str, within_s: float = 120.0) -> None:
    end = time.monotonic() + within_s
    while line not in server.log_text():
        assert time.monotonic() < end, f"no {line!r} in the server log within {within_s:g}s"
        time.sleep(0.1)


def _nothing_left(server, pids: set[int]) -> None:
    server.stop()
    assert server.shm_entries() == []
    assert getattr(server, "leftover", []) == []
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == []


@pytest.mark.timeout(600)
def test_sp2_hung_follower_driver_and_text_encoder_fail_fast_and_recover(tmp_path):
    from test_server_harness import Server

    server = Server(tmp_path, base_config="sp2.toml", edits=EDITS, extra=EXCLUSIVE)
    pids = {p.pid for p in server.stage_procs()}
    try:
        ref = _image(_post(server, REF))
        _check_hang(server, "denoiser", 1, 2, ref, pids, mid_request=True, failures=1, meanwhile=True)
        _check_hang(server, "denoiser", 0, 2, ref, pids, mid_request=True, failures=2)
        _check_hang(server, "text_encoder", 0, 1, ref, pids, mid_request=True, turn_wait=True, failures=1)
        log = server.log_text()
        assert "denoiser[0] ready (generation 3)" in log and "text_encoder[0] ready (generation 2)" in log
        assert not re.search(r"exit code None", log)
    finally:
        _nothing_left(server, pids)


@pytest.mark.timeout(500)
@pytest.mark.parametrize("config", ["cfg2.toml", "pp2.toml"])
def test_hung_follower_and_driver_of_cfg2_and_pp2_fail_fast_and_recover(tmp_path, config):
    from test_server_harness import Server

    server = Server(tmp_path, base_config=config, edits=EDITS, extra=EXCLUSIVE)
    pids = {p.pid for p in server.stage_procs()}
    try:
        ref = _image(_post(server, REF))
        _check_hang(server, "denoiser", 1, 2, ref, pids, mid_request=True, failures=1, meanwhile=True)
        # then the driver (rank 0, which holds the node's compute token while it steps), on the same server
        _check_hang(server, "denoiser", 0, 2, ref, pids, mid_request=True, failures=2)
        _wait_for_log(server, "denoiser[0] ready (generation 3)")  # one restart per hang
        if config == "cfg2.toml":  # stopped, then killed by hand: the death names the signal, not "exit code None"
            victim = _victim(server, "denoiser", 1, 2)
            victim.send_signal(signal.SIGSTOP)
            victim.send_signal(signal.SIGKILL)
            _wait_for_log(server, "denoiser[0] ready (generation 4)")
            assert "denoiser[0] rank 1 died (killed by signal SIGKILL) on node" in server.log_text()
            assert _image(_post(server, REF)) == ref
            pids.update(p.pid for p in server.stage_procs())
    finally:
        _nothing_left(server, pids)
