"""When a stage forms a batch (``StageExecutor.take_batch`` under ``DriverLoop.loop``): an idle stage dispatches a
lone item at once, whatever ``batch_timeout_ms`` says; items that arrive while the stage is busy form the next
batch; only a busy stage may wait (at most ``batch_timeout_ms``) to top a batch up. No wall clock is asserted: the
tests count the driver's waits and run the window on a fake clock."""

from __future__ import annotations

import queue

import numpy as np
import pytest

from omni_runtime.runtime.driver_loop import DriverLoop
from omni_runtime.runtime.messages import Result, Stop, Work
from omni_runtime.runtime.requests import parse_request
from omni_runtime.runtime.stage_exec import StageExecutor


def _work(rid: str, size: str = "16x16") -> Work:
    return Work(req_id=rid, index=0, seed=1, params=parse_request({"prompt": "x", "size": size}))


class Engine:
    """Records each batch; ``during`` maps a batch number to the messages that arrive while it runs."""

    name = "vae"

    def __init__(self, inbox: queue.Queue, during: dict[int, list]) -> None:
        self.inbox, self.during = inbox, during
        self.batches: list[list[int]] = []

    def batch_key(self, item) -> tuple:
        return (item.params.width, item.params.height)

    def step(self, items, stop=None):
        self.batches.append([it.seed for it in items])
        for msg in self.during.get(len(self.batches), []):
            self.inbox.put(msg)
        return [np.zeros((4, 4, 3), np.uint8) for _ in items]


class Loop(DriverLoop):
    """The driver loop over a queue; records every ``receive`` timeout (the driver's waits)."""

    idle_poll_s = 0.25

    def __init__(self, executor: StageExecutor, inbox: queue.Queue) -> None:
        super().__init__(executor)
        self.inbox = inbox
        self.waits: list[float] = []
        self.sent: list[Result] = []

    def receive(self, timeout_s: float) -> None:
        self.waits.append(timeout_s)
        try:
            msg = self.inbox.get(timeout=timeout_s) if timeout_s > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        self.take(msg)
        while True:
            try:
                self.take(self.inbox.get_nowait())
            except queue.Empty:
                return

    def send(self, res: Result) -> None:
        self.sent.append(res)


def _run(during: dict[int, list], first: list, batch_timeout_ms: float, max_batch_size: int = 8):
    inbox: queue.Queue = queue.Queue()
    engine = Engine(inbox, during)
    ex = StageExecutor(engine, "vae", 0, max_batch_size=max_batch_size, batch_timeout_ms=batch_timeout_ms)
    loop = Loop(ex, inbox)
    for msg in first:
        inbox.put(msg)
    loop.loop()
    return engine, loop


def test_an_idle_stage_dispatches_a_lone_item_without_waiting_out_the_window():
    # a 10 s window: before, the lone item waited it out (receive(10.0)); now the driver only polls (receive(0))
    w = _work("a")
    w.seed = 7
    engine, loop = _run({1: [Stop()]}, [w], batch_timeout_ms=10_000)
    assert engine.batches == [[7]]
    assert [r.req_id for r in loop.sent] == ["a"] and loop.sent[0].ok
    # idle wait (the item comes), one look for more (0), run; idle wait (the Stop comes)
    assert loop.waits == [loop.idle_poll_s, 0, loop.idle_poll_s]


def test_items_that_arrive_while_the_stage_is_busy_form_the_next_batch_at_once():
    busy = [_work(f"b{i}") for i in range(3)]
    for i, w in enumerate(busy):
        w.seed = 10 + i
    first = _work("a")
    first.seed = 1
    # while batch 1 (a, alone) runs, b0..b2 arrive; then, while batch 2 runs, the Stop
    engine, loop = _run({1: busy, 2: [Stop()]}, [first], batch_timeout_ms=0)
    assert engine.batches == [[1], [10, 11, 12]]
    assert [r.batch_size for r in loop.sent] == [1, 3, 3, 3]
    assert all(t in (0, loop.idle_poll_s) for t in loop.waits), loop.waits


def test_a_busy_batch_of_another_size_leaves_the_rest_queued_for_the_next():
    busy = [_work("b0"), _work("c0", size="32x32"), _work("b1")]
    for i, w in enumerate(busy):
        w.seed = 10 + i
    first = _work("a")
    first.seed = 1
    engine, loop = _run({1: busy, 3: [Stop()]}, [first], batch_timeout_ms=0, max_batch_size=8)
    assert engine.batches == [[1], [10, 12], [11]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0


def _executor(batch_timeout_ms: float, max_batch_size: int = 8) -> tuple[StageExecutor, FakeClock]:
    ex = StageExecutor(Engine(queue.Queue(), {}), "vae", 0, max_batch_size=max_batch_size,
                       batch_timeout_ms=batch_timeout_ms)
    clock = FakeClock()
    ex.clock = lambda: clock.now
    return ex, clock


def test_only_a_busy_stage_tops_up_its_batch_and_for_at_most_the_window():
    ex, clock = _executor(batch_timeout_ms=20)
    waits: list[float] = []

    def wait(s: float) -> None:  # nothing arrives; the fake clock moves by what the driver waited
        waits.append(s)
        clock.now += s

    ex.offer(_work("a"))
    assert len(ex.take_batch(wait, busy=False)) == 1 and waits == [0]  # idle: no window at all
    ex.offer(_work("b"))
    waits.clear()
    assert len(ex.take_batch(wait, busy=True)) == 1
    assert waits == [0, pytest.approx(0.02)]  # busy: one wait, the whole window, no more


def test_a_busy_stage_stops_topping_up_once_the_batch_is_full():
    ex, clock = _executor(batch_timeout_ms=20, max_batch_size=2)
    waits: list[float] = []

    def wait(s: float) -> None:  # one item arrives 5 ms into the window
        waits.append(s)
        if s > 0:
            clock.now += 0.005
            ex.offer(_work("late"))

    ex.offer(_work("a"))
    batch = ex.take_batch(wait, busy=True)
    assert [p.work.req_id for p in batch] == ["a", "late"]
    assert waits == [0, pytest.approx(0.02)]  # full after the first wait: no second one
