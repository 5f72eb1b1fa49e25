"""The stage driver (runtime.stage_shell.Driver) over real channels, with an engine that computes nothing: what it
does with undecodable bytes, a forged tensor ref, an expired item, a Cancel for a queued item and for an item of
the running batch, and Stop."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from omni_runtime.comm.channel import SyncReceiver, SyncSender
from omni_runtime.comm.shm_tensor import ShmHandle, TensorSlot
from omni_runtime.comm.tensor_meta import TensorMeta
from omni_runtime.runtime.messages import Cancel, Outbound, Ready, Result, Stop, Work
from omni_runtime.runtime.rank_fanout import RankFanout
from omni_runtime.runtime.requests import parse_request
from omni_runtime.runtime.stage_exec import DROPPED, StageExecutor
from omni_runtime.runtime.stage_shell import Driver

STEPS = 40


class StepEngine:
    """Takes ``STEPS`` steps of 10 ms per batch and asks ``stop`` before each, as the denoiser does."""

    name = "denoiser"

    def __init__(self) -> None:
        self.started = threading.Event()
        self.asked: list[int] = []
        self.busy_until_queued: tuple[StageExecutor, int] | None = None  # see _while_busy
        # step 1 waits (asking stop again) until an item leaves the batch: a Cancel sent once ``started`` is set
        # lands mid-batch however slow the machine is (no sleep before it)
        self.hold_until_dropped = False

    def batch_key(self, item) -> tuple:
        return (item.params.width, item.params.height)

    def step(self, items, stop=None):
        alive = set(range(len(items)))
        self.started.set()
        if self.busy_until_queued is not None:  # the busy batch: it runs until the driver holds n queued items
            ex, n = self.busy_until_queued
            self.busy_until_queued = None
            end = time.monotonic() + 10
            while len(ex.pending) < n and time.monotonic() < end:
                stop(0)  # the driver takes in what arrived
                time.sleep(0.005)
            return [np.zeros((16, 16, 3), np.uint8) for _ in items]
        for i in range(STEPS):
            if stop is not None:
                self.asked.append(i)
                alive -= set(stop(i))
                end = time.monotonic() + 10
                while self.hold_until_dropped and i == 1 and len(alive) == len(items) and time.monotonic() < end:
                    time.sleep(0.005)
                    alive -= set(stop(i))
            if not alive:
                break
            time.sleep(0.01)
        return [np.zeros((16, 16, 3), np.uint8) if k in alive else None for k in range(len(items))]


def _work(rid: str, **kw) -> Work:
    return Work(req_id=rid, index=0, seed=1, params=parse_request({"prompt": "x", "size": "16x16"}), **kw)


@pytest.fixture
def driver(tmp_path):
    engine = StepEngine()
    ex = StageExecutor(engine, "denoiser", 0, max_batch_size=8, batch_timeout_ms=20)
    d = Driver(ex, RankFanout(0, 1), f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out")
    results = SyncReceiver(f"ipc://{tmp_path}/out")
    inbox = SyncSender(f"ipc://{tmp_path}/in")
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    assert isinstance(results.recv(Outbound, timeout=10), Ready)
    engine.executor = ex
    yield engine, inbox, results
    inbox.send(Stop())
    t.join(10)
    assert not t.is_alive()
    d.close()
    inbox.close()
    results.close()


def _results(results, n: int) -> dict[str, Result]:
    """The next ``n`` Results (the StepReports the driver sends after each denoising step are skipped)."""
    out = {}
    while len(out) < n:
        r = results.recv(Outbound, timeout=10)
        if isinstance(r, Result):
            out[r.req_id] = r
    return out


def test_bad_bytes_forged_refs_and_expired_items_fail_alone(driver):
    _, inbox, results = driver
    inbox.send_frames([b"\x00garbage"])
    inbox.send_frames([b"\x82\xa4type\xa4work\xa6req_id\x05"])  # the right tag, the wrong fields
    forged = ShmHandle(name="omni_nobody_1_1_deadbeef", owner_pid=1, total_bytes=64,
                       tensors=(TensorSlot("latents", TensorMeta("float32", (4,)), 64),))
    inbox.send(_work("forged", inputs=forged))
    inbox.send(_work("expired", deadline=time.time() - 1))
    inbox.send(_work("good"))
    got = _results(results, 3)
    assert not got["forged"].ok and "ShmHandleError" in got["forged"].error
    assert not got["expired"].ok and got["expired"].error == DROPPED
    assert got["good"].ok and got["good"].image[:4] == b"\x89PNG"


def _while_busy(engine, inbox, n: int) -> None:
    """Make the stage busy (a batch of another size runs until the driver holds the ``n`` items sent next), so
    those items queue and form one batch: an idle stage dispatches a lone item at once."""
    engine.busy_until_queued = (engine.executor, n)
    inbox.send(Work(req_id="busy", index=0, seed=1, params=parse_request({"prompt": "x", "size": "32x32"})))
    assert engine.started.wait(10)
    engine.started.clear()


def test_a_cancel_takes_an_item_out_of_the_running_batch_at_the_next_step(driver):
    engine, inbox, results = driver
    _while_busy(engine, inbox, 2)
    engine.hold_until_dropped = True
    inbox.send(_work("a"))
    inbox.send(_work("b"))
    assert engine.started.wait(10)
    inbox.send(Cancel("a"))
    got = _results(results, 3)
    assert not got["a"].ok and got["a"].error == DROPPED
    assert got["b"].ok and got["b"].batch_size == 2  # they ran as one batch; b went on to the end
    assert engine.asked == list(range(STEPS))


def test_a_cancel_for_a_queued_item_drops_it_before_it_runs(driver):
    engine, inbox, results = driver
    inbox.send(Cancel("q"))
    inbox.send(_work("q"))
    inbox.send(_work("r"))
    got = _results(results, 2)
    assert got["q"].error == DROPPED and got["r"].ok and got["r"].batch_size == 1


def test_an_item_that_expires_mid_batch_leaves_it_and_the_other_goes_on(driver):
    engine, inbox, results = driver
    _while_busy(engine, inbox, 2)
    inbox.send(_work("soon", deadline=time.time() + 0.15))  # the batch takes STEPS x 10 ms = 0.4 s
    inbox.send(_work("later"))
    got = _results(results, 3)
    assert not got["soon"].ok and got["soon"].error == DROPPED
    assert got["later"].ok and got["later"].batch_size == 2
    assert engine.asked == list(range(STEPS))


def test_max_batch_pixels_bounds_how_many_images_of_a_size_share_a_batch():
    # 5 queued 64x64 images, a cap of 2 x 64 x 64 pixels: batches of 2, 2, 1 (before: one batch of 5, the cap unused)
    ex = StageExecutor(StepEngine(), "denoiser", 0, max_batch_size=8, batch_timeout_ms=0,
                       max_batch_pixels=2 * 64 * 64)
    for i in range(5):
        ex.offer(Work(req_id=f"r{i}", index=0, seed=i, params=parse_request({"prompt": "x", "size": "64x64"})))
    sizes = []
    while ex.pending:
        sizes.append(len(ex.take_batch(lambda s: None)))
    assert sizes == [2, 2, 1]
    # no cap: max_batch_size decides; an image larger than the cap alone still runs (the edge refuses requests over it)
    assert StageExecutor(StepEngine(), "denoiser", 0, max_batch_size=8, batch_timeout_ms=0).batch_limit(_work("a")) == 8
    tight = StageExecutor(StepEngine(), "denoiser", 0, max_batch_size=8, batch_timeout_ms=0, max_batch_pixels=100)
    assert tight.batch_limit(_work("b")) == 1
