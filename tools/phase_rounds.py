"""Benchmark phases that take turns, each in its own rank processes started and warmed up once.

The parent (:func:`phase_rounds`) starts every rank of every phase, waits until all are warm, then per round lets
one phase run at a time, the phases' order rotated per round (none always runs first, or on the machine the
previous phase left warm); each rank (:func:`rank_rounds`) writes its numbers of the round as JSON, which the
parent reads back. ``tools/bench_parallel.py cfg`` and ``tools/bench_video_sp.py`` share it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from omni_runtime.runtime.launcher import free_port


def _result_file(out: str, tag: str, round_: int, rank: int) -> Path:
    return Path(out, f"{tag}-{round_}-rank{rank}.json")


def rank_rounds(out: str, tag: str, rank: int, go: list[Any], done: list[Any], measure: Callable[[], dict]) -> None:
    """A rank's side, once it is warm and has set its ``ready``: per round ``i`` wait for ``go[i]``, write
    ``measure()`` as the round's numbers, set ``done[i]``."""
    for i in range(len(go)):
        go[i].wait()
        _result_file(out, tag, i, rank).write_text(json.dumps(measure()))
        done[i].set()


def phase_rounds(target: Callable[..., None], phases: dict[str, int], rank_args: Callable[[str, int, int], tuple],
                 out: str, rounds: int, timeout: float,
                 name: str = "") -> Iterator[tuple[int, dict[str, list[dict]]]]:
    """The parent's side. ``phases``: tag -> ranks. Starts ``target(*rank_args(tag, rank, port), ready, go, done)``
    for every rank of every phase (spawned, one free port per phase), waits for every ``ready``, then yields
    ``(i, {tag: the numbers of each rank})`` after round ``i`` ran every phase once. Past ``timeout`` seconds, or
    when a rank exits with an error, raises ``RuntimeError`` naming what did not finish (prefixed by ``name``);
    every process is gone when the generator ends."""
    ctx = mp.get_context("spawn")
    events = {tag: ([ctx.Event() for _ in range(world)], [ctx.Event() for _ in range(rounds)],
                    [[ctx.Event() for _ in range(rounds)] for _ in range(world)]) for tag, world in phases.items()}
    procs = []
    for tag, world in phases.items():
        port = free_port()
        ready, go, done = events[tag]
        procs += [ctx.Process(target=target, args=(*rank_args(tag, r, port), ready[r], go, done[r]))
                  for r in range(world)]
    try:
        for p in procs:
            p.start()
        end = time.monotonic() + timeout

        def wait(event: Any, what: str) -> None:
            while not event.wait(1.0):
                if time.monotonic() > end or any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"{name}{what} did not finish; exit codes {[p.exitcode for p in procs]}")

        for tag, world in phases.items():
            for r in range(world):
                wait(events[tag][0][r], f"{tag} rank {r} start")
        order = list(phases)
        for i in range(rounds):
            results = {}
            for tag in order[i % len(order):] + order[:i % len(order)]:
                events[tag][1][i].set()
                for r in range(phases[tag]):
                    wait(events[tag][2][r][i], f"{tag} round {i} rank {r}")
                results[tag] = [json.loads(_result_file(out, tag, i, r).read_text()) for r in range(phases[tag])]
            yield i, results
        for p in procs:
            p.join(max(1.0, end - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
