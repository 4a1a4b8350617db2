"""``python -m qk_jax.train``: a usage error is one line; (slow) kill -9 and resume continue the same run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qk_jax.training import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_usage_error_is_one_line_and_exit_code_2():
    out = subprocess.run([sys.executable, "-m", "qk_jax.train", "--config", "configs/stage1.py:tiny"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == ("error: give --config configs/stageN.py[:variant] (or "
                                                    "configs/shapes.py) and --workdir DIR"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "USAGE" not in out.stderr



@pytest.mark.slow
def test_kill_and_resume_continues_the_same_run(tmp_path):
    """kill -9 after a checkpoint, rerun the same command: the losses after resume equal an uninterrupted run."""
    args = ["--config", "configs/stage1.py:tiny", "--config.total_steps=8", "--config.checkpoint_every=2",
            f"--config.data.dir={tmp_path / 'data'}"]
    cmd = [sys.executable, "-m", "qk_jax.train"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(cmd + args + [f"--workdir={tmp_path / 'straight'}"], cwd=root, check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + args + [f"--workdir={killed}"], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "4").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd + args + [f"--workdir={killed}"], cwd=root, check=True, capture_output=True)

    straight = metrics.read_jsonl(str(tmp_path / "straight" / metrics.JSONL))
    resumed = metrics.read_jsonl(str(killed / metrics.JSONL))
    assert sorted(straight) == sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        np.testing.assert_allclose(resumed[step]["loss"], straight[step]["loss"], rtol=1e-6, err_msg=f"step {step}")
    with open(killed / metrics.JSONL) as f:
        assert any(json.loads(line).get("restart") for line in f)  # it really resumed
