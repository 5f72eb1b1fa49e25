"""How the stage processes on one node share its CPU cores: torch threads per rank, turn-taking, OpenMP waiting.

By default every stage's ranks split all the cores between them (:func:`stage_threads`), so on a CPU node the text
encoder, the denoiser and the VAE each run a full OpenMP team on the same cores. When two of them compute at once
those teams oversubscribe the cores, and an OpenMP team that spins while it waits (libgomp's default, ~300k rounds
after every parallel region) burns the very cores its late members need. ``[placement] cpu_sharing`` says what to
do about it (:data:`CPU_SHARING`):

- ``"exclusive"``: the stages take turns. A stage's driver holds the node's :class:`ComputeToken` while its ranks
  compute one step (a batch of the text encoder or VAE, one denoising step of the denoiser's running set) and
  hands it on at every step boundary to whichever stage waits for it. One team computes at a time, so the ranks
  keep libgomp's spinning between parallel regions, which answers the next region without a futex wake-up.
- ``"concurrent"``: the stages compute at the same time. Oversubscribed, the ranks run with
  ``OMP_WAIT_POLICY=PASSIVE`` (an idle OpenMP thread sleeps at once); not oversubscribed (every rank's threads
  fit the cores: ``threads`` set per stage), they keep libgomp's default.
- ``"auto"`` (the default): ``"exclusive"`` when the CPU ranks on this node ask for more threads than it has cores,
  else ``"concurrent"``. Under ``launcher = "ray"``: ``"concurrent"`` (ranks spread over nodes; no token).

Measured on 2 cores (docs/BENCHMARKS.md, issue 16): ``PASSIVE`` cost a lone request 12 % of denoiser time (every
parallel region wakes sleeping threads), libgomp's spinning with stages computing at once lost 13 % of throughput at
16 clients; taking turns gave 1.07-1.11x diffusers' throughput at 4 and 16 clients in most runs, the cores busy
99 % of the time (2 cores have no idle core for a second stage to fill).

:class:`ComputeToken` is two ``flock`` files in the instance's run directory: the kernel releases a dead holder's
lock, so a SIGKILLed stage never leaves the others waiting. ``<token>.want`` is held shared by every stage waiting
for its turn; the holder, when it lets go, waits until those have had theirs before it asks again (flock alone is not
fair: the releaser would take it straight back). The holder writes its label (``denoiser[0]``) into the token file,
so a stage that waits for its turn can say who holds it (its heartbeat reports it; a request that times out there
names the holder: issue 31).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omni_runtime.runtime.config import CPU_SHARING

if TYPE_CHECKING:
    from omni_runtime.runtime.config import RuntimeConfig
    from omni_runtime.runtime.placement import Placement

__all__ = ["CPU_SHARING", "ComputeToken", "CoreBudget", "core_budget", "cpus", "omp_env", "resolve_sharing",
           "stage_threads"]

PASSIVE_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Stages that compute at once on oversubscribed cores: an idle OpenMP thread sleeps at once. Stages that take turns
keep libgomp's default (~300k spins, a few ms, after each parallel region): a shorter spin (``GOMP_SPINCOUNT=10000``)
measured the same for a lone denoiser batch in-process, but made the served text encoder 2-4x and the tiny denoiser
2x slower (a thread that went to sleep between two regions pays a costly wake-up on this VM), and ``PASSIVE`` cost
a lone request 12 % of denoiser time (docs/BENCHMARKS.md, issue 16)."""
USER_OMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
HOLDER_BYTES = 64  # the holder's label at the start of the token file


def cpus() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def stage_threads(world_size: int, cores: int, configured: int = 0) -> int:
    """torch threads of one rank: ``stages.<name>.threads`` when set, else the stage's ranks split every core.

    Every stage gets every core by default: stages mostly run one after another for a request, and on 2 cores
    giving the text encoder and VAE one thread each cost ~50 ms of latency per request while throughput at 16
    clients stayed within the run-to-run noise (docs/BENCHMARKS.md). The stages then take turns on the cores
    (``cpu_sharing = "auto"`` resolves to ``"exclusive"``)."""
    if configured > 0:
        return configured
    return max(1, cores // world_size)


def resolve_sharing(setting: str, launcher: str, threads: Iterable[int], cores: int) -> str:
    """``"exclusive"`` or ``"concurrent"``: what ``[placement] cpu_sharing = setting`` means for CPU ranks with
    ``threads`` torch threads each on a node of ``cores`` cores."""
    if setting not in CPU_SHARING:
        raise ValueError(f"placement.cpu_sharing = {setting!r}: allowed values are "
                         f"{', '.join(repr(s) for s in CPU_SHARING)}")
    if setting != "auto":
        return setting
    if launcher != "local":
        return "concurrent"
    return "exclusive" if sum(threads) > cores else "concurrent"


def omp_env(sharing: str, oversubscribed: bool, environ: dict[str, str] | os._Environ[str] = os.environ
            ) -> dict[str, str]:
    """The OpenMP settings the rank processes start with (given to the forkserver: libgomp reads them when torch
    loads): :data:`PASSIVE_ENV` for oversubscribed stages that compute at once, else nothing (libgomp's default
    spinning; stages that take turns). ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set by the user wins: nothing is
    added."""
    if any(k in environ for k in USER_OMP_KEYS):
        return {}
    return dict(PASSIVE_ENV) if sharing == "concurrent" and oversubscribed else {}


@dataclass(frozen=True)
class CoreBudget:
    """How the CPU ranks of this node share its cores: what the local launcher applies and ``check`` prints."""

    setting: str          # [placement] cpu_sharing as configured
    sharing: str          # "exclusive" | "concurrent"
    threads: int          # torch threads of every CPU rank on this node, summed
    cores: int
    omp: dict[str, str]   # given to the ranks' forkserver (runtime.cores.omp_env)

    @property
    def exclusive(self) -> bool:
        return self.sharing == "exclusive"

    def format(self) -> str:
        how = ("stages take turns computing; OpenMP threads spin between regions" if self.exclusive
               else "stages compute at once")
        omp = " ".join(f"{k}={v}" for k, v in self.omp.items()) or "libgomp defaults"
        return (f"cpu sharing: {self.sharing} (placement.cpu_sharing = {self.setting!r}; {self.threads} torch "
                f"thread(s) of CPU ranks on {self.cores} core(s): {how}; OpenMP: {omp})")


def core_budget(cfg: RuntimeConfig, placement: Placement, cores: int | None = None) -> CoreBudget:
    """The :class:`CoreBudget` of the CPU ranks that ``placement`` puts on the frontend's node."""
    cores = cpus() if cores is None else cores
    node = placement.frontend_node
    threads = [stage_threads(rep.world_size, cores, cfg.stages.get(rep.stage).threads)
               for rep in placement.replicas for rk in rep.ranks if rk.node == node and rk.device == "cpu"]
    sharing = resolve_sharing(cfg.placement.cpu_sharing, placement.launcher, threads, cores)
    return CoreBudget(setting=cfg.placement.cpu_sharing, sharing=sharing, threads=sum(threads), cores=cores,
                      omp=omp_env(sharing, sum(threads) > cores))


class ComputeToken:
    """The turn of one stage process to compute on the node's cores (``cpu_sharing = "exclusive"``).

    ``with token:`` waits for the turn and gives it up after (to every stage that waited meanwhile first);
    :meth:`hand_over` between the steps of a long batch lets waiting stages go first and takes the turn back.
    One owner thread per instance; every process opens its own. ``label``: what :meth:`holder` says while this one
    holds the turn; ``waiting``: True while it waits for the turn (read by the rank's heartbeat thread)."""

    def __init__(self, path: str | Path, label: str = "") -> None:
        self.path = str(path)
        self.label = label
        self.waiting = False
        self._token = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._want = os.open(self.path + ".want", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            os.close(self._token)
            raise
        self.held = False

    def acquire(self) -> None:
        self.waiting = True
        try:
            fcntl.flock(self._want, fcntl.LOCK_SH)  # "I am waiting": a releaser lets me go before it asks again
            try:
                fcntl.flock(self._token, fcntl.LOCK_EX)
            finally:
                fcntl.flock(self._want, fcntl.LOCK_UN)
        finally:
            self.waiting = False
        self.held = True
        if self.label:
            with contextlib.suppress(OSError):
                os.pwrite(self._token, self.label.encode()[:HOLDER_BYTES].ljust(HOLDER_BYTES), 0)

    def holder(self) -> str:
        """The label of the stage that holds the turn (or held it last); "" if unknown."""
        try:
            return os.pread(self._token, HOLDER_BYTES, 0).decode(errors="replace").strip()
        except OSError:
            return ""

    def release(self) -> None:
        """Give the turn up; returns once every stage that was waiting for it has had it (at once if none)."""
        fcntl.flock(self._token, fcntl.LOCK_UN)
        self.held = False
        fcntl.flock(self._want, fcntl.LOCK_EX)
        fcntl.flock(self._want, fcntl.LOCK_UN)

    def others_waiting(self) -> bool:
        try:
            fcntl.flock(self._want, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._want, fcntl.LOCK_UN)
        return False

    def hand_over(self) -> None:
        """Between two steps while holding the turn: let the stages waiting for it go first, then take it back."""
        if self.held and self.others_waiting():
            self.release()
            self.acquire()

    def __enter__(self) -> ComputeToken:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def close(self) -> None:
        for fd in (self._token, self._want):
            try:
                os.close(fd)  # closing drops a lock still held
            except OSError:
                pass
