"""``omni-runtime batch`` / ``run_batch``: manifest, resumption after an interruption, bad lines; ``generate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omni_runtime.runtime.cli import main
from omni_runtime.runtime.config_load import load_config
from omni_runtime.runtime.offline import run_batch

ROOT = Path(__file__).resolve().parent.parent
LINES = [{"prompt": f"item {i}", "seed": i, "size": "32x32", "num_inference_steps": 1} for i in range(4)]
LINES[2]["n"] = 2


@pytest.fixture(scope="module")
def omni():
    from omni_runtime.runtime import Omni

    with Omni(ROOT / "configs" / "default.toml", in_process=True) as o:
        yield o


class Interrupting:
    """Wraps an Omni; the ``stop_after``-th submit raises KeyboardInterrupt (a Ctrl-C mid-run)."""

    def __init__(self, omni, stop_after: int) -> None:
        self.omni, self.stop_after, self.calls = omni, stop_after, []

    def submit(self, req):
        if len(self.calls) == self.stop_after:
            raise KeyboardInterrupt
        self.calls.append(req.prompt)
        return self.omni.submit(req)


def test_interrupted_batch_resumes_without_redoing(tmp_path, omni):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in LINES) + "\n")
    out = tmp_path / "out"
    cfg = load_config(ROOT / "configs" / "default.toml")
    first = Interrupting(omni, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_batch(cfg, prompts, out, omni=first, max_in_flight=1)
    assert first.calls == ["item 0", "item 1"]
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert sorted(done_before) == ["00001.png", "00002.png"]
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"line": 3, "fi')  # a manifest line cut short by the interruption
    second = Interrupting(omni, stop_after=99)
    stats = run_batch(cfg, prompts, out, omni=second)
    assert second.calls == ["item 2", "item 3"]
    assert stats == {"total": 4, "skipped": 2, "generated": 2}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0000[12].png")} == done_before
    assert sorted(p.name for p in out.glob("*.png")) == ["00001.png", "00002.png", "00003-0.png", "00003-1.png",
                                                          "00004.png"]
    entries = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines() if x.endswith("}")]
    assert sorted(e["line"] for e in entries) == [1, 2, 3, 4]
    assert next(e for e in entries if e["line"] == 3)["seeds"] == [2, 3]
    third = Interrupting(omni, stop_after=0)
    assert run_batch(cfg, prompts, out, omni=third) == {"total": 4, "skipped": 4, "generated": 0}
    # the file on disk is the image the API gives for that seed
    ref = np.asarray(omni.generate("item 3", seed=3, size="32x32", num_inference_steps=1)[0])
    assert np.array_equal(np.asarray(Image.open(out / "00004.png")), ref)


def test_batch_cli_rejects_a_bad_line_naming_it(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(LINES[0]) + "\n" + json.dumps({"prompt": "x", "steps": 3}) + "\n")
    code = main(["batch", "--config", str(ROOT / "configs" / "default.toml"), str(prompts), "--out-dir",
                 str(tmp_path / "o"), "--in-process"])
    assert code == 2
    err = capsys.readouterr().err
    assert "p.jsonl line 2: steps: unknown field" in err


def test_generate_cli_in_process_writes_the_seeded_image(tmp_path, omni):
    out = tmp_path / "x.png"
    code = main(["generate", "--config", str(ROOT / "configs" / "default.toml"), "--prompt", "a boat",
                 "--seed", "4", "--steps", "2", "--size", "48x32", "--in-process", "-o", str(out)])
    assert code == 0
    ref = np.asarray(omni.generate("a boat", seed=4, size="48x32", num_inference_steps=2)[0])
    got = np.asarray(Image.open(out))
    assert got.shape == (32, 48, 3) and np.array_equal(got, ref)
    assert main(["generate", "--config", str(ROOT / "configs" / "default.toml"), "--prompt", "a", "--size",
                 "17x17", "--in-process", "-o", str(out)]) == 2


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_ctrl_c_with_work_in_flight_exits_with_one_line(tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group of ``batch`` and its stage processes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{i}", "seed": i, "size": "128x128",
                                           "num_inference_steps": 8}) + "\n" for i in range(64)))
    out = tmp_path / "out"
    instance = f"batchint{os.getpid()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "omni_runtime.runtime.cli", "--log-level", "WARNING", "batch", "--config",
         str(ROOT / "configs" / "default.toml"), str(prompts), "--out-dir", str(out)],
        cwd=ROOT, env={**os.environ, "OMNI_RUNTIME_INSTANCE": instance}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        # as from a terminal: SIGINT at its default even when this suite runs as a background job (a shell starts
        # those with SIGINT ignored, which the child would inherit, and Python then never raises KeyboardInterrupt)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        manifest = out / "manifest.jsonl"
        end = time.monotonic() + 300
        while time.monotonic() < end and not (manifest.exists() and manifest.stat().st_size):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # lines are still in flight: 16 submitted, one done
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("omni-runtime batch: ")]
    assert len(line) == 1 and "interrupted: " in line[0] and "of 64 line(s) done" in line[0], err[-3000:]
    done = [json.loads(x) for x in manifest.read_text().splitlines()]  # every manifest line is whole
    assert 1 <= len(done) < 64
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"omni_{instance}-")] == []
