"""Rules of the engine/shell split that a grep can check: engines do no I/O and tensors between stages pass one
seam (``runtime.tensor_handoff``). That ``comm.channel`` is the only socket factory is tests/test_repo_rules.py's."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHM = re.compile(r"shm_tensor|ShmHandle|ShmPool", re.M)
IO = re.compile(r"^\s*(import|from)\s+(zmq|socket|multiprocessing|omni_runtime\.comm)\b|shm_tensor", re.M)


def _py(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_only_the_handoff_seam_and_the_launcher_touch_shm_tensors_in_runtime():
    # the launchers sweep the segments of dead ranks (process lifetime, not tensor handoff)
    allowed = {"runtime/tensor_handoff.py", "runtime/launcher.py", "runtime/ray_launcher.py"}
    users = {str(p.relative_to(ROOT)) for p in _py("runtime") if SHM.search(p.read_text())}
    assert users - allowed == set()


def test_engines_do_no_io():
    for name in ("engine.py", "denoiser.py", "text_encoder.py", "vae.py"):
        assert IO.search((ROOT / "stages" / name).read_text()) is None, name


def test_the_rules_catch_a_violation():
    assert SHM.search("from omni_runtime.comm import shm_tensor")
    assert IO.search("import zmq\n") and IO.search("from omni_runtime.comm.channel import Sender\n")
