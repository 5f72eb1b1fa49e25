"""``omni-runtime generate`` through the stage processes gives the in-process (Omni(in_process=True)) image for the seed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_generate_through_stage_processes_matches_in_process(tmp_path):
    from omni_runtime.runtime import Omni

    out = tmp_path / "fox.png"
    instance = f"clitest{os.getpid()}"
    proc = subprocess.run(
        [sys.executable, "-m", "omni_runtime.runtime.cli", "--log-level", "WARNING", "generate", "--config",
         str(ROOT / "configs" / "default.toml"), "--prompt", "a fox", "--negative-prompt", "blurry", "--seed", "9",
         "--steps", "2", "--size", "48x64", "--true-cfg-scale", "2.0", "--guidance", "4.0", "-o", str(out)],
        cwd=ROOT, env={**os.environ, "OMNI_RUNTIME_INSTANCE": instance}, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout and "seed 9, 48x64, 2 steps" in proc.stdout
    with Omni(ROOT / "configs" / "default.toml", in_process=True) as omni:
        ref = omni.generate("a fox", negative_prompt="blurry", seed=9, num_inference_steps=2, size="48x64",
                            true_cfg_scale=2.0, guidance_scale=4.0)[0]
    got = np.asarray(Image.open(out))
    assert got.shape == (64, 48, 3) and np.array_equal(got, np.asarray(ref))
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"omni_{instance}-")] == []


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_omni_never_closed_still_cleans_up_at_exit(tmp_path):
    import psutil

    script = tmp_path / "noclose.py"
    script.write_text("import os\nfrom omni_runtime.runtime import Omni\nif __name__ == '__main__':\n"
                      "    o = Omni('configs/default.toml')\n"
                      "    print(os.getpid(), len(o.generate('x', size='32x32', num_inference_steps=1)))\n")
    instance = f"noclose{os.getpid()}"
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMNI_RUNTIME_INSTANCE": instance, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    pid, count = map(int, proc.stdout.split())
    assert count == 1
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"omni_{instance}-")] == []  # leaked 2 before
    assert "leaked" not in proc.stderr
    ours = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("OMNI_RUNTIME_INSTANCE") == instance:
                ours.append(p.pid)
        except psutil.Error:
            pass
    assert ours == []  # no rank process outlived the script
