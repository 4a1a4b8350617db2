"""``python -m qk_jax.train``: a usage error is one line; (slow) kill -9 and resume continue the same run; (slow) a
crash at each phase, or a damaged latest checkpoint, reruns to the same final params bit for bit."""

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


def test_an_init_from_without_a_model_is_a_usage_error(tmp_path, monkeypatch):
    # A wrong --config.init_from is the user's to fix: one line naming the folder, not a traceback from the loader.
    from absl import app

    from qk_jax import train

    argv = ["--config", os.path.join(ROOT, "configs/stage2.py:tiny"), "--workdir", str(tmp_path / "run"),
            f"--config.init_from={tmp_path / 'nothing'}"]
    monkeypatch.setattr(sys, "argv", ["qk_jax.train", *argv])  # ml_collections reads overrides from sys.argv
    with pytest.raises(app.UsageError, match=f"{tmp_path / 'nothing' / 'final'} is not a qk_jax model checkpoint"):
        train.main(argv)


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


# A run that dies as under kill -9 (``os._exit``: no finally, no atexit, nothing flushed) at one phase, chosen in the
# process itself so that the phase is hit every time rather than by a race.
CRASH = r'''
import os, sys
import orbax.checkpoint as ocp
from qk_jax import train
from qk_jax.models import saved_model
from qk_jax.training import checkpoint as ckpt

phase, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]  # at: the step the phase is taken at
die = lambda: os._exit(137)
save, frozen_save, write_config = ckpt.Checkpointer.save, ocp.StandardCheckpointer.save, saved_model._write_config

def checkpoint_save(self, state, *args, **kwargs):
    step = int(state.step)
    if phase == "mid_step" and step == at:
        self.wait()
        die()  # step `at` dispatched, the checkpoint before it complete, nothing of step `at` saved
    started = save(self, state, *args, **kwargs)
    if phase == "async_save" and started and step == at:
        die()  # checkpoint `at` being written in the background
    return started

def standard_save(self, path, *args, **kwargs):
    frozen_save(self, path, *args, **kwargs)
    if phase == "frozen_save" and str(path).endswith("/frozen"):
        die()  # the frozen params half written, before their wait_until_finished

def final_config(path, *args, **kwargs):
    if phase == "final_save":
        die()  # final's params written, its config.json not, nothing renamed
    write_config(path, *args, **kwargs)

ckpt.Checkpointer.save, ocp.StandardCheckpointer.save, saved_model._write_config = (
    checkpoint_save, standard_save, final_config)
train.main(argv)
'''
TINY = ["--config", "configs/stage1.py:tiny", "--config.total_steps=8", "--config.checkpoint_every=2"]


def _final_params(workdir):
    from qk_jax.models import saved_model
    from qk_jax.pytree import flatten

    return {k: np.asarray(v) for k, v in flatten(saved_model.load_model(workdir / "final")[1]).items()}


def _assert_bit_identical(got, want, what):
    assert got.keys() == want.keys(), what
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg=f"{what}: {path}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    data = f"--config.data.dir={root / 'data'}"
    subprocess.run([sys.executable, "-m", "qk_jax.train", *TINY, data, f"--workdir={root / 'run'}"], cwd=ROOT,
                   check=True, capture_output=True, timeout=600)
    return data, _final_params(root / "run")


def _crash_then_rerun(workdir, phase, data):
    at = {"mid_step": 5, "async_save": 4}.get(phase, 0)
    died = subprocess.run([sys.executable, "-c", CRASH, phase, str(at), *TINY, data, f"--workdir={workdir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert died.returncode == 137, died.stderr[-3000:]
    rerun = subprocess.run([sys.executable, "-m", "qk_jax.train", *TINY, data, f"--workdir={workdir}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return rerun.stderr


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["mid_step", "async_save", "frozen_save", "final_save"])
def test_a_crash_at_each_phase_reruns_to_the_same_final_params(tmp_path, straight, phase):
    data, want = straight
    log = _crash_then_rerun(tmp_path / "run", phase, data)
    _assert_bit_identical(_final_params(tmp_path / "run"), want, phase)
    if phase in ("mid_step", "async_save"):
        assert ("resumed from step 4" if phase == "mid_step" else "resumed from step 2") in log, log[-3000:]


@pytest.mark.slow
def test_each_damage_to_the_latest_checkpoint_reruns_to_the_same_final_params(tmp_path, straight):
    """Killed after checkpoint 6 (4 intact below it), the latest damaged in each of the six ways of
    ``test_checkpoint``: each rerun falls back to checkpoint 4 and ends bit-identical to the uninterrupted run."""
    import shutil

    from test_checkpoint import DAMAGES, _damage

    data, want = straight
    crashed = tmp_path / "crashed"
    died = subprocess.run([sys.executable, "-c", CRASH, "mid_step", "7", *TINY, data,
                           f"--workdir={crashed}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert died.returncode == 137 and (crashed / "checkpoints" / "6").is_dir(), died.stderr[-3000:]
    for how in DAMAGES:
        workdir = tmp_path / how
        shutil.copytree(crashed, workdir)
        _damage(workdir / "checkpoints" / "6", how)
        rerun = subprocess.run([sys.executable, "-m", "qk_jax.train", *TINY, data, f"--workdir={workdir}"], cwd=ROOT,
                               capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0 and "resumed from step 4" in rerun.stderr, rerun.stderr[-3000:]
        _assert_bit_identical(_final_params(workdir), want, how)
