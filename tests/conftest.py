"""Shared test setup: offline hub, tools/ importable, one tiny model per session, and a leak check.

The session fails if it leaves any ``/dev/shm/omni_*`` segment behind: every segment a test or the runtime
creates has an owner that must unlink it, also after a crash. A segment counts as this session's leak when its
owner (the pid in its name) is dead or is a still-running process of this session; segments of other live
processes (another test session or server on the same machine) are left alone.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
from pathlib import Path

import psutil
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent / "tools"))
sys.path.insert(0, str(TESTS))

#: What the session's one forkserver (the parent of every tests/spawn.py worker and of every rank an in-process
#: launcher starts) imports before its first fork, so that no worker pays it again: the FSDP/DTensor modules (and sympy)
#: of the HSDP workers, transformers' model loading (~2.5 s of CPU) that every worker encoding prompts with the
#: tiny text encoders (stage_refs) needs, diffusers' model base, and the engines. Set once collection is done, so
#: that no module's own ``set_forkserver_preload`` at import time wins by being imported last.
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.tensor",
                      "transformers.modeling_utils", "transformers.models.clip.modeling_clip",
                      "transformers.models.t5.modeling_t5", "diffusers.models.modeling_utils",
                      "diffusers.models.autoencoders.autoencoder_kl",
                      "omni_runtime.stages.engine", "omni_runtime.runtime.stage_shell"]

SHM = Path("/dev/shm")
_OWNER = re.compile(r"^omni_.+_(\d+)_\d+_[0-9a-f]{8}$")


def _our_segments() -> set[str]:
    return {p.name for p in SHM.glob("omni_*")} if SHM.is_dir() else set()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config._omni_shm_before = _our_segments()  # type: ignore[attr-defined]


def pytest_collection_finish(session: pytest.Session) -> None:
    multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = getattr(session.config, "_omni_shm_before", set())
    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}

    def leaked_by_us(name: str) -> bool:
        m = _OWNER.match(name)
        if m is None:
            return True
        pid = int(m.group(1))
        return pid in ours or not psutil.pid_exists(pid)

    leaked = sorted(n for n in _our_segments() - before if leaked_by_us(n))
    if leaked:
        for name in leaked:
            (SHM / name).unlink(missing_ok=True)
        session.config.get_terminal_writer().line(
            f"LEAK: the test session left {len(leaked)} /dev/shm segment(s) behind: {leaked[:10]}", red=True)
        if exitstatus == 0:
            session.exitstatus = 1


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny FLUX model (omni_runtime.stages.models.flux.tiny), written once per test session."""
    from omni_runtime.stages.models.flux.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def qwen_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen-Image model (omni_runtime.stages.models.qwen_image.tiny), written once per test session."""
    from omni_runtime.stages.models.qwen_image.tiny import make_tiny_qwen_image

    return make_tiny_qwen_image(tmp_path_factory.mktemp("qwen_tiny") / "model", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def wan_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Wan 2.1 text-to-video model (omni_runtime.stages.models.wan.tiny), written once per test session."""
    from omni_runtime.stages.models.wan.tiny import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("wan_tiny") / "model", preset="tiny", seed=0)
