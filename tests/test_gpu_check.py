"""tools/gpu_check.py: on a machine without CUDA it says so in one line and exits 0; its checks run (on CPU and gloo,
``--device cpu``) and print one line each and a summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).resolve().parent.parent / "tools" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the line of a machine without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_0() -> None:
    r = _run()
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"gpu_check: no CUDA device on this machine (torch {torch.__version__} sees "
                                     "none): nothing to check"], r.stdout


def test_checks_print_one_line_each_and_a_summary() -> None:
    r = _run("--device", "cpu", "--only", "world-1 groups,flash-attn")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("gpu_check on cpu") and len(lines) == 4, lines
    assert lines[1].startswith("SKIP flash-attn: CUDA only")
    assert lines[2].startswith("PASS world-1 groups: default group cpu:gloo")
    assert lines[3].startswith("gpu_check: 1 passed, 0 failed, 1 skipped in ")


def test_skipped_checks_say_why() -> None:
    r = _run("--device", "cpu", "--only", "served ulysses 2")  # needs the default layout's image: skipped, not failed
    assert r.returncode == 0 and "SKIP served ulysses 2: the default layout's image is missing" in r.stdout, r.stdout
    r = _run("--device", "cpu", "--only", "world-1 groups", "--budget-s", "-1")
    assert r.returncode == 0 and "SKIP world-1 groups: the -1 s budget is spent" in r.stdout, r.stdout
