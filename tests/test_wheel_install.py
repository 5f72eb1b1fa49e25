"""The built wheel installs under one namespace and breaks nobody: next to Jupyter's ``comm`` both work.

The project's folders ``runtime``, ``stages``, ``parallel`` and ``comm`` used to install as top-level packages;
``comm`` is also Jupyter's package (ipykernel depends on it), so a non-editable install overwrote
``site-packages/comm/__init__.py`` and ``comm.create_comm`` vanished. Here the wheel is built from a copy of the
source, installed with pip into a target directory that already holds Jupyter's ``comm``, and a fresh interpreter
(``-S``: no site hooks, so the editable install of the checkout is out of the picture) imports both.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "runtime", "stages", "parallel", "comm")

pytestmark = pytest.mark.slow


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(p, src / name)
    out = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, timeout=300, capture_output=True)
    (wheel,) = out.glob("omni_runtime-*.whl")
    return wheel


def test_every_package_folder_is_listed_in_pyproject() -> None:
    # setuptools' explicit ``packages`` list: a folder missing from it is silently left out of the wheel
    # (parallel/all2all was: a wheel install could not import the expert-parallel managers)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"omni_runtime." + ".".join(p.parent.relative_to(ROOT).parts)
             for top in ("runtime", "stages", "parallel", "comm") for p in (ROOT / top).rglob("__init__.py")}
    assert found == listed


def test_wheel_installs_under_one_namespace_next_to_jupyter_comm(tmp_path: Path) -> None:
    # Jupyter's comm, which the test extra installs (found through its distribution: ``import comm`` here would
    # find this checkout's own comm/ folder, since pytest runs from the repo root)
    jupyter_comm = Path(importlib.metadata.distribution("comm").locate_file("comm"))
    assert (jupyter_comm / "__init__.py").is_file()
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.startswith("omni_runtime")} == set(), tops
    # every module of the four folders is in the wheel (a package missing from pyproject's list would not be)
    ours = {f"omni_runtime/{p.relative_to(ROOT).as_posix()}" for pkg in SOURCES[2:] for p in (ROOT / pkg).rglob("*.py")}
    assert ours - set(names) == set()

    target = tmp_path / "site"
    shutil.copytree(jupyter_comm, target / "comm")  # Jupyter's comm is already there
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--upgrade",
                    "--target", str(target), str(wheel)], check=True, timeout=300, capture_output=True)

    deps = [p for p in sys.path if p.endswith("site-packages")]
    code = (
        "import comm, sys\n"
        "assert callable(comm.create_comm), 'Jupyter comm lost create_comm'\n"
        "c = comm.create_comm()\n"
        "from omni_runtime.comm import serde\n"
        "from omni_runtime.runtime.config_load import load_config\n"
        "import omni_runtime.runtime.cli, omni_runtime.stages.models.flux.tiny as tiny\n"
        "print(comm.__file__); print(tiny.__file__); print(type(c).__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *deps])}
    run = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    comm_file, tiny_file, comm_kind = run.stdout.split()
    assert comm_file == str(target / "comm" / "__init__.py")
    assert tiny_file.startswith(str(target / "omni_runtime" / "stages")), tiny_file
    assert comm_kind.endswith("Comm")  # DummyComm when no kernel runs
