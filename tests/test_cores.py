"""How the stages on one node share its cores (runtime.cores, issue 16): what ``[placement] cpu_sharing`` resolves to,
the OpenMP settings the ranks get, the compute token between real processes (one holder at a time, a waiter gets the
next turn, a SIGKILLed holder frees it), the driver computing only in its turn, ``check`` and the launcher's specs,
and bad values."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from omni_runtime.runtime import cores
from omni_runtime.runtime.config import ConfigError
from omni_runtime.runtime.config_load import config_from_dict
from omni_runtime.runtime.cores import ComputeToken, core_budget, omp_env, resolve_sharing
from omni_runtime.runtime.messages import Work
from omni_runtime.runtime.placement import compute_placement
from omni_runtime.runtime.requests import parse_request
from omni_runtime.runtime.stage_exec import StageExecutor

ROOT = Path(__file__).resolve().parent.parent
CTX = mp.get_context("spawn")


def _cfg(placement=None, **stages):
    raw = {"model": {"path": str(ROOT / "models" / "tiny-flux")}, "stages": stages}
    if placement is not None:
        raw["placement"] = placement
    return config_from_dict(raw)


# --------------------------------------------------------------------------------------------- the setting


@pytest.mark.parametrize(("setting", "launcher", "threads", "expected"), [
    ("auto", "local", [2, 2, 2], "exclusive"),     # every stage on both cores: oversubscribed, take turns
    ("auto", "local", [1, 1], "concurrent"),       # threads set per stage to fit the cores
    ("auto", "ray", [2, 2, 2], "concurrent"),      # ranks spread over nodes: no token
    ("exclusive", "local", [1], "exclusive"),
    ("concurrent", "local", [8, 8], "concurrent"),
])
def test_cpu_sharing_resolves_from_threads_and_cores(setting, launcher, threads, expected):
    assert resolve_sharing(setting, launcher, threads, cores=2) == expected


def test_omp_env_sleeps_only_oversubscribed_stages_that_compute_at_once_and_the_user_wins():
    assert omp_env("concurrent", True, environ={}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert omp_env("concurrent", False, environ={}) == {}
    assert omp_env("exclusive", True, environ={}) == {}  # one team at a time: libgomp's spinning
    assert omp_env("concurrent", True, environ={"GOMP_SPINCOUNT": "1000"}) == {}
    assert omp_env("concurrent", True, environ={"OMP_WAIT_POLICY": "ACTIVE"}) == {}


def test_core_budget_of_the_default_config_and_with_threads_that_fit(tmp_path):
    cfg = _cfg()
    b = core_budget(cfg, compute_placement(cfg, str(tmp_path)), cores=4)
    assert (b.sharing, b.threads, b.cores) == ("exclusive", 12, 4)
    assert b.omp == {}
    assert "cpu sharing: exclusive" in b.format() and "'auto'" in b.format()
    fit = _cfg(text_encoder={"threads": 1}, denoiser={"threads": 2}, vae={"threads": 1})
    b = core_budget(fit, compute_placement(fit, str(tmp_path)), cores=4)
    assert (b.sharing, b.threads, b.omp) == ("concurrent", 4, {})
    forced = _cfg({"cpu_sharing": "concurrent"})
    b = core_budget(forced, compute_placement(forced, str(tmp_path)), cores=4)
    assert b.sharing == "concurrent" and (b.omp == {"OMP_WAIT_POLICY": "PASSIVE"}
                                          or any(k in os.environ for k in cores.USER_OMP_KEYS))


@pytest.mark.parametrize(("placement", "expected"), [
    ({"cpu_sharing": "turns"}, "placement.cpu_sharing = 'turns': allowed values are 'auto', 'exclusive', "
                               "'concurrent'"),
    ({"cpu_sharing": 1}, "placement.cpu_sharing = 1 (int): must be a string"),
    ({"cpu_sharing": "exclusive", "launcher": "ray"},
     "placement.cpu_sharing = 'exclusive' with placement.launcher = 'ray': the ranks of a Ray cluster do not take "
     "turns; allowed there: 'auto', 'concurrent'"),
])
def test_bad_cpu_sharing_names_the_key_and_the_allowed_values(placement, expected):
    with pytest.raises(ConfigError) as e:
        _cfg(placement)
    assert str(e.value).startswith(expected), str(e.value)


def test_check_prints_the_cpu_sharing(capsys):
    from omni_runtime.runtime.cli import main

    assert main(["check", str(ROOT / "configs" / "default.toml")]) == 0
    out = capsys.readouterr().out
    assert "cpu sharing: exclusive (placement.cpu_sharing = 'auto';" in out


def test_the_launcher_gives_every_cpu_rank_the_token_of_its_run_dir_unless_concurrent():
    from omni_runtime.runtime.launcher import LocalLauncher

    for placement, exclusive in (({}, True), ({"cpu_sharing": "concurrent"}, False)):
        cfg = _cfg(placement, denoiser={"parallel": {"ulysses": 2}})
        launcher = LocalLauncher(cfg)
        try:
            specs = [s for reps in launcher.replicas.values() for r in reps for s in r.specs()]
            assert len(specs) == 4
            want = str(launcher.run_dir / "compute.token") if exclusive else ""
            assert {s.compute_token for s in specs} == {want}
        finally:
            launcher.shutdown()


# --------------------------------------------------------------------------------------------- the token


def _turns(path: str, n: int, hold_s: float, log: str, started=None) -> None:
    tok = ComputeToken(path)
    if started is not None:
        started.set()
    with open(log, "a") as f:
        for _ in range(n):
            with tok:
                f.write(f"{os.getpid()} in {time.monotonic():.6f}\n")
                f.flush()
                time.sleep(hold_s)
                f.write(f"{os.getpid()} out {time.monotonic():.6f}\n")
                f.flush()
    tok.close()


def test_one_process_at_a_time_holds_the_turn(tmp_path):
    path, log = str(tmp_path / "token"), str(tmp_path / "log")
    procs = [CTX.Process(target=_turns, args=(path, 8, 0.01, log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    events = [line.split() for line in Path(log).read_text().splitlines()]
    assert len(events) == 3 * 8 * 2
    holder = None
    for pid, what, _ in sorted(events, key=lambda e: float(e[2])):
        if what == "in":
            assert holder is None, "two processes computed at once"
            holder = pid
        else:
            assert holder == pid
            holder = None
    assert len({e[0] for e in events}) == 3


def _wait_turn(path: str, asking, done) -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # the releaser's core: it runs when that one yields
    tok = ComputeToken(path)
    asking.set()
    tok.acquire()
    done.wait(60)
    tok.release()
    tok.close()


def test_letting_go_returns_only_once_the_waiter_has_the_turn(tmp_path):
    # what makes it fair, checked without timing: right after release() nobody else can take the token, because
    # the stage that was waiting already holds it. Both processes on one core, so that the waiter, woken when the
    # lock goes, cannot take it before the releaser looks (without the gate it could not, and the probe would win).
    import fcntl

    path = str(tmp_path / "token")
    tok = ComputeToken(path)
    tok.acquire()
    asking, done = CTX.Event(), CTX.Event()
    p = CTX.Process(target=_wait_turn, args=(path, asking, done))
    p.start()
    affinity = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(affinity)})
        assert asking.wait(60)
        end = time.monotonic() + 30
        while not tok.others_waiting():  # the waiter holds the want gate before it blocks on the token
            assert time.monotonic() < end
            time.sleep(0.01)
        tok.release()
        probe = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
        done.set()
        p.join(30)
        assert p.exitcode == 0
    finally:
        os.sched_setaffinity(0, affinity)
        done.set()
        p.kill()
        p.join(10)
        tok.close()


def _hold_forever(path: str, held) -> None:
    tok = ComputeToken(path)
    tok.acquire()
    held.set()
    time.sleep(600)


def test_a_killed_holder_frees_the_turn(tmp_path):
    path = str(tmp_path / "token")
    held = CTX.Event()
    p = CTX.Process(target=_hold_forever, args=(path, held))
    p.start()
    try:
        assert held.wait(60)
        tok = ComputeToken(path)
        got = threading.Event()
        t = threading.Thread(target=lambda: (tok.acquire(), got.set()), daemon=True)
        t.start()
        assert not got.wait(0.3)  # held by the other process
        os.kill(p.pid, signal.SIGKILL)
        assert got.wait(30)  # the kernel dropped the dead holder's lock
        tok.release()
        tok.close()
    finally:
        p.kill()
        p.join(30)


def test_hand_over_keeps_the_turn_when_nobody_waits(tmp_path):
    tok = ComputeToken(tmp_path / "token")
    tok.acquire()
    assert not tok.others_waiting()
    tok.hand_over()
    assert tok.held
    tok.release()
    assert not tok.held
    tok.close()


# --------------------------------------------------------------------------------------------- the driver


class _Token:
    """Records when the executor takes and gives up its turn."""

    def __init__(self, log: list) -> None:
        self.log, self.held = log, False

    def __enter__(self):
        self.log.append("acquire")
        self.held = True
        return self

    def __exit__(self, *exc):
        self.log.append("release")
        self.held = False

    def hand_over(self) -> None:
        self.log.append("hand_over")


class _Engine:
    name = "vae"

    def __init__(self, log: list, token: _Token) -> None:
        self.log, self.token = log, token

    def batch_key(self, item):
        return 0

    def step(self, items, stop=None):
        assert self.token.held, "computed outside the stage's turn"
        self.log.append("compute")
        for i in range(2):
            stop(i)
        return [np.zeros((4, 4, 3), np.uint8) for _ in items]


def test_the_executor_computes_in_its_turn_announces_first_and_hands_over_between_steps():
    from omni_runtime.runtime.driver_loop import DriverLoop

    log: list = []
    token = _Token(log)
    ex = StageExecutor(_Engine(log, token), "vae", 0, max_batch_size=4, batch_timeout_ms=0, token=token)
    ex.offer(Work(req_id="a", index=0, seed=1, params=parse_request({"prompt": "x", "size": "16x16"})))
    loop = DriverLoop(ex, broadcast=lambda msg: log.append(type(msg).__name__))
    loop.receive = lambda timeout_s: None
    sent = []
    loop.send = sent.append
    batch = ex.take_batch(lambda s: None)
    results = ex.run(batch, stop=loop._stop_hook(batch), announce=lambda: log.append("announce"))
    assert results[0].ok and results[0].image
    assert log == ["acquire", "announce", "compute", "StepDecision", "hand_over", "StepDecision", "release"]


class _StepEngine:
    """A step-level engine stub (``stages.engine.StepEngine``): every item takes two steps and ends as a tiny
    image."""

    name = "denoiser"
    padding_waste = 0.0

    def __init__(self, log: list, token: _Token) -> None:
        self.log, self.token, self.running = log, token, {}

    def batch_key(self, item):
        return 0

    def step(self, items, stop=None):
        raise AssertionError("a step engine under step-level scheduling runs run_step, not step")

    def join_key(self, item):
        return 0

    def row_tokens(self, item):
        return 1, 1

    def admit(self, slot, item):
        self.running[slot] = 2

    def drop(self, slot):
        self.running.pop(slot, None)

    def progress(self, slot):
        return 2 - self.running[slot], 2

    def cache_stats(self, slot):
        return None

    def take_previews(self):
        return {}

    def run_step(self):
        assert self.token.held, "a step ran outside the stage's turn"
        self.log.append("step")
        out = {}
        for s in list(self.running):
            self.running[s] -= 1
            if not self.running[s]:
                del self.running[s]
                out[s] = np.zeros((4, 4, 3), np.uint8)
        return out


def test_the_step_loop_plans_and_runs_each_step_in_its_turn_and_gives_it_up_between_steps():
    from omni_runtime.runtime.driver_loop import DriverLoop

    log: list = []
    token = _Token(log)
    engine = _StepEngine(log, token)
    ex = StageExecutor(engine, "denoiser", 0, max_batch_size=4, batch_timeout_ms=0, scheduling="step", token=token)
    ex.offer(Work(req_id="a", index=0, seed=1, params=parse_request({"prompt": "x", "size": "16x16"})))
    loop = DriverLoop(ex, broadcast=lambda msg: log.append(type(msg).__name__))
    sent = []
    loop.send = sent.append

    def receive(timeout_s: float) -> None:
        if not ex.pending and not engine.running:
            loop.stopping = True

    loop.receive = receive
    loop.loop()
    assert log == ["acquire", "StepDecision", "step", "release"] * 2 + ["Stop"]
    assert [r.ok for r in sent if hasattr(r, "ok")] == [True]
